"""Calibration capture (one content-hashed set per run) and the block-by-block quantization engine."""
