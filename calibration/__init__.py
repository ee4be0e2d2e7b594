"""INT8 calibration (installed as ``segformer_edge.calibration``): calibration sets, recipes and policies."""
