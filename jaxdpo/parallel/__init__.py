"""Parallelism: the mesh and logical-axis rules, multi-host start-up, the sequence axis."""
