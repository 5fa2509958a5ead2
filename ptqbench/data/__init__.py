"""Data every stage draws on: the SynthVQA generator (calibration, evaluation and the testbed's training)."""
