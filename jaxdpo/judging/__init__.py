"""Judges: the judge protocol and the registry of judge kinds (rule functions, reward models), pair formation, win rate."""
