"""The ``segformer-edge`` command line: a thin root app with one module per command."""
