"""The bad-step limit (train.max_bad_steps), checked every step without stalling the device.

The train step returns the state's count of consecutive non-finite steps (`bad_steps`: 0 after a good
step). Reading it at once would wait for the step to finish before the next one is queued; the watch
reads each step's counter one step late, after the next step was dispatched, when the device has it
ready and still has the next step to work on. A stop is found at most one step after the limit.
"""

from __future__ import annotations

import jax

from jaxdpo.errors import EXIT_DIVERGED, TrainingStopped


class BadStepWatch:
    """`limit_reached(step, bad_steps, last=...)` after dispatching each step."""

    def __init__(self, limit: int):
        self.limit = limit
        self._queued = None  # (step, its bad_steps counter on the device), not read yet
        self.stopped_at: tuple[int, int] | None = None  # (step, counter) where the limit was reached

    def limit_reached(self, step: int, bad_steps: jax.Array, *, last: bool = False) -> bool:
        """Queue this step's counter and read the previous step's (and, after the `last` step, this one's
        too: nothing follows it); True once a counter reached the limit."""
        previous, self._queued = self._queued, (step, bad_steps)
        if previous is not None and self._over(*previous):
            return True
        return last and self._over(*self._queued)

    def _over(self, step: int, bad_steps: jax.Array) -> bool:
        count = int(jax.device_get(bad_steps))
        if count >= self.limit:
            self.stopped_at = (step, count)
        return count >= self.limit

    def stop(self, saved_step: int, directory: str) -> TrainingStopped:
        """The error that ends the run, once the newest good state is saved as `saved_step`."""
        step, count = self.stopped_at
        return TrainingStopped(
            f"stopped: steps {step - count + 1}-{step} had a non-finite loss, gradient or update "
            f"({count} in a row, train.max_bad_steps={self.limit}); none of them was applied. The newest good "
            f"state is checkpoint step {saved_step} in {directory}. Lower the learning rate (e.g. "
            f"--config.optim.lr=..., allowed on resume) or check the data, then rerun the same command to resume.",
            EXIT_DIVERGED)
