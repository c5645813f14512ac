"""Preemption: catch SIGTERM and Ctrl-C so the loop can finish its step, save and exit cleanly.

`install_preemption_handler()` returns a `PreemptionFlag`, `preempted(step)`, which the training loop asks after each step's
save; on a multi-host run every process agrees on the answer (they save together). `resume_message`
is what a preempted run prints: rerun the same command with the same workdir.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading

import jax

from jaxdpo.parallel.distributed import all_processes_agree


class PreemptionFlag:
    """`flag(step=None) -> bool`: has a stop been asked for? Single host: true once a signal arrived.
    Multi-host: every process must agree on the same step (they save together), so the flags are
    all-gathered; on TPU pods JAX's preemption notifier (`reached_preemption_sync_point`) also counts when
    `step` is given."""

    def __init__(self, previous_handlers: dict):
        self._event = threading.Event()
        self._previous = previous_handlers

    def set(self) -> None:
        self._event.set()

    def __call__(self, step: int | None = None) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        if step is not None and _reached_preemption_sync_point(step):
            local = True
        return not all_processes_agree(not local)  # any process preempted -> all stop together

    def restore_signal_handlers(self) -> None:
        """Put back the handlers from before (a training run inside a larger program, e.g. a test session)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def install_preemption_handler() -> PreemptionFlag:
    """Catch SIGTERM (and the first Ctrl-C) so the loop can finish its step, save and exit cleanly.

    A second Ctrl-C kills the run at once (the default handler is put back after the first). Must be
    called from the main thread (Python only delivers signals there); `flag.restore_signal_handlers()`
    undoes the installation.
    """
    flag = PreemptionFlag({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})

    def on_sigterm(signum, frame):
        flag.set()
        print("jaxdpo: SIGTERM received; finishing the current step, then saving a checkpoint and exiting",
              file=sys.stderr, flush=True)

    def on_sigint(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("jaxdpo: Ctrl-C received; finishing the current step, then saving a checkpoint and exiting "
              "(press Ctrl-C again to stop immediately without saving)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    return flag


def _reached_preemption_sync_point(step: int) -> bool:
    """JAX's coordination-service preemption notice (TPU maintenance events); False where unavailable."""
    try:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # no distributed client / preemption service on this platform
        return False


def resume_message(workdir: str, command: list[str] | None = None) -> str:
    """What to print when exiting after a preemption save: rerun the same command with the same workdir."""
    command = command if command is not None else [sys.executable, "-m", "jaxdpo.train", *sys.argv[1:]]
    return (f"jaxdpo: checkpoint saved in {workdir}; to resume, rerun the same command with the same workdir:\n"
            f"  {shlex.join(command)}")
