"""Edge targets (installed as ``segformer_edge.converters``): one module per runtime plus the registry."""
