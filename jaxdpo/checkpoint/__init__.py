"""Checkpoints: the orbax manager, per-leaf checksums, the resume fingerprint, policies read back."""
