"""Kernels and numerics: attention backends (XLA, cuDNN, splash, ring) and chunked logprobs."""
