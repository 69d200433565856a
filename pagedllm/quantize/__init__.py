"""Offline weight quantization that writes a checkpoint: AWQ-style int4 calibration."""
