"""Entry point: python -m jaxdpo.train --config=configs/dpo.py [--config.key=value ...]

A bad config never reaches the compiler: the `--config.*` overrides are checked against the config file
before absl parses them (unknown key -> the nearest known key; wrong type), then `config.validate` checks
the finished config. Every such problem is one line on stderr, `jaxdpo: ...`, and exit status 2.

Exit statuses (jaxdpo/errors.py): 0 finished; 2 a config, input, workdir or disk problem (one line);
3 stopped after train.max_bad_steps non-finite steps in a row (newest good state saved); 75 (EX_TEMPFAIL)
preempted by SIGTERM or Ctrl-C, checkpoint saved: rerun the same command to resume.
"""

import logging
import os
import sys
import traceback
import warnings

# Simulated CPU devices (--xla_force_host_platform_device_count) deadlock in all-reduce when XLA's
# concurrency-optimized CPU scheduler orders collectives differently per device; turn it off there.
if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") and \
        "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

from absl import app, flags
from ml_collections import config_flags

from jaxdpo import config as config_lib
from jaxdpo import errors

DEFAULT_CONFIG = "configs/dpo.py"
# Every key a run reads, with its default: other config files must have exactly these keys.
SCHEMA_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dpo.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Path to a configs/*.py file.")


def _fail(message: str) -> None:
    print(f"jaxdpo: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def _config_path(argv) -> str:
    """The --config=PATH (or --config PATH) argument as absl will read it (the last one wins); the
    default otherwise."""
    path = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1]
    return path


def load_config_file(spec: str):
    """get_config() of a config file, `path[:argument]` as ml_collections takes it."""
    import importlib.util

    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"config file {path!r} does not exist (run from the repository root, or "
                                     f"pass --config=/abs/path/to/config.py)")
    module_spec = importlib.util.spec_from_file_location("_jaxdpo_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(argument) if argument else module.get_config()
    except Exception as e:  # the user's own Python: say which file and what, without the trace
        raise config_lib.ConfigError(f"could not load config file {path!r}: {type(e).__name__}: {e}") from None


def precheck(argv) -> None:
    """Check the config file and its --config.* overrides before absl parses them."""
    path = _config_path(argv)
    config = load_config_file(path)
    if os.path.isfile(SCHEMA_CONFIG) and os.path.abspath(path.partition(":")[0]) != SCHEMA_CONFIG:
        config_lib.check_schema(config, load_config_file(SCHEMA_CONFIG), source=f"config file {path!r}")
    config_lib.check_overrides(config, argv[1:])


def _parse_flags(argv):
    """absl's flag parsing, with anything the precheck did not foresee still reported in one line."""
    try:
        precheck(argv)
        return flags.FLAGS(argv)
    except config_lib.ConfigError as e:
        _fail(str(e))
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        _fail(f"bad command line: {text}")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; options look like --config.train.steps=100")
    config = _CONFIG.value
    _quiet_third_party_logs()
    _one_line_notices()
    try:
        config = resolve_hub_names(config)
        config_lib.validate(config)
        from jaxdpo.parallel import distributed
        distributed.initialize(config.distributed)
        if config.online.rounds:
            from jaxdpo.online.rounds import run_online
            run = run_online(config)  # the last round's run; None when every round was already done
        else:
            from jaxdpo.training.loop import train_and_evaluate
            run = train_and_evaluate(config)
    except config_lib.ConfigError as e:
        print(f"jaxdpo: {e}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_USER_ERROR)
    except errors.TrainingStopped as e:
        print(f"jaxdpo: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    # A scheduler (or `train && convert`) must tell "preempted, saved, rerun me" from "finished".
    sys.exit(errors.EXIT_PREEMPTED if run is not None and run.preempted else errors.EXIT_FINISHED)


def resolve_hub_names(config):
    """`config` with hub names (org/name[@revision]) replaced by their snapshots in the HF cache; a run that
    will resume trains from the commits its newest checkpoint recorded."""
    from jaxdpo.checkpoint.manager import newest_meta_on_disk
    from jaxdpo.models import hub

    meta = newest_meta_on_disk(os.path.join(config.workdir, "checkpoints")) or {}
    return hub.resolve_config(config, pins=meta.get(hub.META_KEY))


class _DropFailedWriteLogs(logging.Filter):
    """A save that fails in the OS (disk full, read-only, quota) makes orbax, and asyncio for orbax's
    futures, log that OS error with tracebacks from several threads before it reaches the loop, which
    reports it in one line (Checkpointer._write_error). Only those records are dropped: an ERROR from
    orbax's code (or with a traceback through it) that carries tensorstore's OS error code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        frames = []
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            text += f" {error}"
            frames = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
        from_orbax = any(f"{os.sep}orbax{os.sep}" in path for path in [record.pathname, *frames])
        return not (from_orbax and "os_error_code" in text)


def _quiet_third_party_logs() -> None:
    """The console starts with jaxdpo's banner: absl's INFO records (the HTTP client's requests, orbax's
    saves, jax's backend notes) are kept out unless --verbosity asks for them."""
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def _one_line_notices() -> None:
    """A damaged file set aside (DamagedFileWarning) is one `jaxdpo:` line on stderr, not Python's two."""
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, errors.DamagedFileWarning):
            return f"jaxdpo: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropFailedWriteLogs())
    sys.unraisablehook = _drop_late_tensorstore_callbacks(sys.unraisablehook)


def _drop_late_tensorstore_callbacks(default):
    """When one write of a save fails (a full disk), orbax closes its event loop while tensorstore's other
    writes are still in flight; each one that finishes later tries to wake the closed loop, and Python
    prints that RuntimeError with a traceback. The save's failure itself is reported in one line
    (Checkpointer._write_error); every other unraisable error still goes to the default hook."""

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        default(unraisable)

    return hook


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
