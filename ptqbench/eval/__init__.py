"""Scoring tasks: the SynthVQA tasks and the lmms-eval bridge."""
