"""Sampling: the jitted KV-cache engine, prompt files, samples written during training."""
