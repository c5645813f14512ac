"""Judges: the judge protocol and its kinds (rule functions, reward models), pair formation, win rate."""
