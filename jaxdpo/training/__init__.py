"""The training loop and its pieces: builders, the jitted step, batches, optimizer, metrics, stop rules."""
