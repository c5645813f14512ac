"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per record), tensorboard scalars, and the
experiment trackers the config enables (jaxdpo/training/trackers.py: W&B, MLflow), which receive every
record at its step, the samples as tables and the paths of the outputs.

Only process 0 writes. A resumed run first drops records past the step it resumes from, and continues
the logging window its checkpoint was saved in (`MetricsWindow.state` travels in the checkpoint meta),
so the file reads as if the run had never stopped, whatever train.save_every and train.log_every are.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import jax

from jaxdpo.errors import ConfigError, DamagedFileWarning

# Key of the window's state in a checkpoint's meta.
WINDOW_META_KEY = "metrics_window"


class MetricsWindow:
    """The train steps since the last logged record; the record is their mean, key by key.

    Per-step metrics stay on the device until they are needed (fetching each step would stall the
    dispatch of the next), then become float64 sums added in step order. Those sums and the step count
    are the whole state: `state()` is saved with every checkpoint and `from_state` continues it, so a
    run stopped mid-window and resumed adds the same numbers in the same order as an uninterrupted run
    and logs bit-identical means. Throughput counts only the steps this process ran (`rates`).
    """

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0):
        self._sums = dict(sums or {})
        self._steps = steps
        self._pending: list[dict] = []  # this process's steps, not yet fetched from the device
        self._here = {"pairs": 0.0, "tokens": 0.0}  # summed over this process's steps only

    @classmethod
    def from_state(cls, state: dict | None) -> "MetricsWindow":
        """The window a checkpoint was saved in (an empty one for checkpoints that carry none)."""
        if not state:
            return cls()
        return cls({k: float(v) for k, v in state["sums"].items()}, int(state["steps"]))

    def add(self, step_metrics: dict) -> None:
        self._pending.append(step_metrics)

    def __len__(self) -> int:
        return self._steps + len(self._pending)

    def _fetch(self) -> None:
        for metrics in jax.device_get(self._pending):
            for key, value in metrics.items():
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
            for key in self._here:
                self._here[key] += float(metrics.get(key, 0.0))
            self._steps += 1
        self._pending = []

    def state(self) -> dict:
        """JSON-ready {"steps", "sums"}: what a checkpoint stores to continue this window."""
        self._fetch()
        return {"steps": self._steps, "sums": dict(self._sums)}

    def mean(self) -> dict[str, float]:
        """Each metric's mean over the window's steps (those restored from a checkpoint included)."""
        self._fetch()
        return {k: v / self._steps for k, v in self._sums.items()}

    def rates(self, elapsed: float) -> dict[str, float]:
        """pairs_per_s and tokens_per_s over the steps this process ran in `elapsed` seconds."""
        self._fetch()
        return {f"{k}_per_s": v / max(elapsed, 1e-9) for k, v in self._here.items()}


class MetricsLogger:
    """`trackers`: a callable returning the trackers to open (`trackers.from_config` bound to the config),
    called on process 0 only, so no other process imports or starts a tracker."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, trackers=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._trackers = []
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import (
                SummaryWriter,  # imported here: only process 0 needs it
            )
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._trackers = list(trackers()) if trackers is not None else []

    def truncate_after(self, step: int) -> None:
        """Keep records with step <= `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        records = _parse_lines(self.path, lines)
        if len(records) < len([line for line in lines if line.strip()]):
            warnings.warn(f"{self.path}: dropped its partial last line (the run stopped while writing it)",
                          DamagedFileWarning, stacklevel=2)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)

    def write(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        for key, value in record.items():
            self._tb.add_scalar(key, float(value), int(step))
        self._tb.flush()
        for tracker in self._trackers:
            tracker.metrics(int(step), {k: float(v) for k, v in record.items()})

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A markdown text record in tensorboard's text tab (samples during training)."""
        if self.enabled:
            self._tb.add_text(tag, text, int(step))
            self._tb.flush()

    def write_table(self, step: int, name: str, rows: list[dict]) -> None:
        """Rows (e.g. the samples of one step) as a table in each tracker."""
        for tracker in self._trackers:
            tracker.table(int(step), name, rows)

    def write_output(self, name: str, path: str) -> None:
        """Where an output of the run was written (the HF export, the adapter), recorded by each tracker."""
        for tracker in self._trackers:
            tracker.output(name, path)

    def tracker_runs(self) -> list[str]:
        """One line per open tracker saying where its run is (for the run's summary)."""
        return [tracker.where() for tracker in self._trackers]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (a partial last line, from a run stopped mid-write, left out)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return _parse_lines(path, f.readlines())


def _parse_lines(path: str, lines: list[str]) -> list[dict]:
    """The JSON records of `lines`; a last line that is not JSON (cut off mid-write) is left out, any other
    such line is a ConfigError naming the file and line."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ConfigError(f"{path}:{number} is not a JSON record ({error.msg}); fix or delete that line") from None
    return records
