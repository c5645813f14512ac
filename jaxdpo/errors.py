"""The error types a user sees, and the exit statuses of `python -m jaxdpo.train`. Imports nothing from
jaxdpo, so every module can raise them.

`ConfigError`: a problem with the user's config or inputs (a key, a file, a data row, the mesh, the
workdir). `python -m jaxdpo.train` prints it as one line, `jaxdpo: ...`, and exits with status 2.
`TrainingStopped`: the run stopped itself (diverged) after saving what it had; one line, its own status.
"""

EXIT_FINISHED = 0
EXIT_USER_ERROR = 2  # ConfigError: fix the config, the inputs or the workdir, then rerun
EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row; the newest good state is saved
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM / Ctrl-C, checkpoint saved; rerun the same command to resume


class ConfigError(ValueError):
    """A problem with the user's config or inputs; train.py prints it in one line and exits non-zero."""


class TrainingStopped(RuntimeError):
    """The run stopped itself after saving what it had; train.py prints the message in one line and exits
    with `exit_status`."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class DamagedFileWarning(UserWarning):
    """A damaged file (checkpoint step, metrics line) was set aside and the run goes on; one line."""
