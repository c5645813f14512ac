"""Where an on-policy round's wall time goes: sampling, judging, training, and everything else.

A round opens a `PhaseClock`; the code that generates, judges or trains runs inside `clock.phase(name)`,
so a compile is counted in the phase whose first call triggers it. `record()` adds `online/seconds_other`:
the round's wall time so far minus the named phases (loading, merging, exporting, writing files).
"""

from __future__ import annotations

import contextlib
import time

PHASES = ("sample", "judge", "train")


class PhaseClock:
    """Wall seconds per phase of one round, from its creation on."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's wall time to `name` (one of PHASES; blocks do not nest)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def record(self) -> dict[str, float]:
        """online/seconds_<phase> for every phase, and online/seconds_other for the rest of the round so far."""
        total = time.perf_counter() - self.started
        named = {f"online/seconds_{name}": seconds for name, seconds in self.seconds.items()}
        return named | {"online/seconds_other": max(0.0, total - sum(self.seconds.values()))}


def phases_text(record: dict[str, float]) -> str:
    """'sample 3 s, judge 0 s, train 41 s, other 2 s' from a record holding online/seconds_*."""
    return ", ".join(f"{name} {record[f'online/seconds_{name}']:.0f} s" for name in (*PHASES, "other"))
