"""Preference losses (one spec per loss) and the reference model in its modes, with the logprob cache."""
