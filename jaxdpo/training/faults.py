"""A named seam for tests that stop a run at an exact point: `JAXDPO_FAULT="<SIGNAL>@<where>"`.

The run announces points by the path of what it just saved or is about to write (`<workdir>/checkpoints/5`
after step 5's save call; `<workdir>/rounds/2.jsonl` before an on-policy round writes its pairs). When the
end of a point's path is `<where>`, the process sends itself `<SIGNAL>` once (SIGKILL after the checkpoint
it just saved is committed, so that a rerun finds it). Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

ENV_VAR = "JAXDPO_FAULT"


def reached(point: str, *, before_kill: Callable[[], None] | None = None) -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    signal_name, _, where = spec.partition("@")
    if not (os.sep + os.path.normpath(point)).endswith(os.sep + os.path.normpath(where)):
        return
    del os.environ[ENV_VAR]  # once: a stop that saves again must not signal again
    number = getattr(signal, signal_name)
    if number == signal.SIGKILL and before_kill is not None:
        before_kill()
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), number)
