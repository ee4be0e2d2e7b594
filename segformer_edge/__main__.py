from segformer_edge.cli.app import main

main()
