"""Kernels and numerics: attention backends (XLA, cuDNN, splash, ring), chunked logprobs and the projections' backward."""
