"""Preemption: catch SIGTERM and Ctrl-C so the loop can finish its step, save and exit cleanly.

`install_preemption_handler()` returns `preempted(step)`, which the training loop asks after each step's
save; on a multi-host run every process agrees on the answer (they save together). `resume_message`
is what a preempted run prints: rerun the same command with the same workdir.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Callable

import jax

from jaxdpo.parallel.distributed import all_processes_agree


def install_preemption_handler() -> Callable[..., bool]:
    """Catch SIGTERM (and the first Ctrl-C) so the loop can finish its step, save and exit cleanly.

    Returns `preempted(step=None) -> bool`. Single host: true once a signal arrived. Multi-host: every
    process must agree on the same step (they save together), so the flags are all-gathered; on TPU pods
    JAX's preemption notifier (`reached_preemption_sync_point`) also counts when `step` is given.
    A second Ctrl-C kills the run at once (the default handler is put back after the first).
    Must be called from the main thread (Python only delivers signals there);
    `preempted.restore_signal_handlers()` undoes the installation.
    """
    flag = threading.Event()

    def on_sigterm(signum, frame):
        flag.set()
        print("jaxdpo: SIGTERM received; finishing the current step, then saving a checkpoint and exiting",
              file=sys.stderr, flush=True)

    def on_sigint(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("jaxdpo: Ctrl-C received; finishing the current step, then saving a checkpoint and exiting "
              "(press Ctrl-C again to stop immediately without saving)", file=sys.stderr, flush=True)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)

    def restore_signal_handlers() -> None:
        """Put back the handlers from before (a training run inside a larger program, e.g. a test session)."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def preempted(step: int | None = None) -> bool:
        local = flag.is_set()
        if jax.process_count() == 1:
            return local
        if step is not None and _reached_preemption_sync_point(step):
            local = True
        return not all_processes_agree(not local)  # any process preempted -> all stop together

    preempted.restore_signal_handlers = restore_signal_handlers
    return preempted


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
