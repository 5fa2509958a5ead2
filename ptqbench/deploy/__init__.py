"""A quantized model deployed: packed storage, inference kernels, latency and memory, GPTQ export."""
