"""On-policy rounds: sample k answers per prompt, judge them, train on the pairs, repeat."""
