"""ptqbench: compare post-training quantization methods for vision-language models."""

__version__ = "0.1.0"
