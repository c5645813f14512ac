"""Checkpoints that survive preemption: orbax, async, rotation, restore onto any mesh, corrupt-step fallback.

A checkpoint step directory holds three orbax items:
  state  -- the pytree of jax arrays (params, opt_state, step, rng, ...), saved sharded as it lives on
            the mesh and restored onto whatever shardings the *current* run asks for (8 devices -> 4 -> 1);
  meta   -- a JSON dict from the trainer (data position, config fingerprint, metrics line count, ...);
  layout -- a JSON dict this module writes for itself (typed PRNG key implementations, jaxdpo version).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when every file is on disk,
so a save interrupted by SIGKILL is never listed as a step; leftovers are removed when a manager opens.
A committed step can still be damaged later (a disk filled up, a file truncated by a copy): restoring
tries the newest step first and falls back to older ones, warning with the step and the reason.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdpo.config import ConfigError
from jaxdpo.data import identity

_STATE, _META, _LAYOUT = "state", "meta", "layout"
FINGERPRINT_KEY = "fingerprint"  # meta[FINGERPRINT_KEY]: the dict that must match for a resume to be valid


class CorruptCheckpointWarning(UserWarning):
    """A committed checkpoint step could not be read; an older step is used instead."""


def _jaxdpo_version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxdpo")
    except Exception:  # not installed as a distribution (running from a source tree)
        return "unknown"


# ----- typed PRNG keys: orbax stores plain arrays, so keys travel as their uint32 key data -----------

def _is_prng_key(leaf) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path)


def _keys_to_data(state) -> tuple[Any, dict[str, str]]:
    """Replace every typed key array by its key data; return the impl name of each, by tree path."""
    impls: dict[str, str] = {}

    def convert(path, leaf):
        if _is_prng_key(leaf):
            impls[_path_name(path)] = str(jax.random.key_impl(leaf))
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, state), impls


def _abstract_key_data(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The abstract uint32 key data of an abstract key array, on the same sharding (trailing dim replicated)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def _abstract_for_storage(abstract_state):
    return jax.tree_util.tree_map(
        lambda leaf: _abstract_key_data(leaf) if _is_prng_key(leaf) else leaf, abstract_state)


def _data_to_keys(restored, abstract_state, impls: Mapping[str, str], step: int):
    def convert(path, leaf, abstract_leaf):
        if not _is_prng_key(abstract_leaf):
            return leaf
        name = _path_name(path)
        if name not in impls:
            raise ConfigError(
                f"checkpoint step {step}: state{name} was saved as plain data but this run expects a PRNG key "
                f"there; the checkpoint comes from an incompatible run, use a fresh workdir")
        key = jax.random.wrap_key_data(leaf, impl=impls[name])
        if key.dtype != abstract_leaf.dtype:
            raise ConfigError(
                f"checkpoint step {step}: state{name} holds a {key.dtype} key but this run uses "
                f"{abstract_leaf.dtype} (jax_default_prng_impl changed?); use the same PRNG or a fresh workdir")
        return key

    return jax.tree_util.tree_map_with_path(convert, restored, abstract_state)


# ----- compatibility checks ---------------------------------------------------------------------------

def _flatten_dict(d: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


# Config keys whose change makes a resumed run something other than the continuation of the saved one:
# the data order and content (so the saved data position means the same pairs), the objective and the
# optimizer. The data files are there by content (jaxdpo.data.identity), not by path. Left out on purpose: mesh/devices (restore reshards), train.steps/epochs (extending a run),
# logging/eval/save cadence, remat/attention/chunking (same math), paths of caches and the workdir.
RESUME_CRITICAL_KEYS = (
    "seed", "model.dtype", "model.param_dtype", "model.tokenizer",
    "lora.rank", "lora.alpha", "lora.dropout", "lora.targets",
    "data.eval_fraction", "data.prompt_key", "data.chosen_key",
    "data.rejected_key", "data.chat_template", "data.max_length", "data.max_prompt_length", "data.truncation",
    "data.layout", "data.on_bad_row", "data.max_samples",
    "loss", "optim", "train.batch_size", "reference.mode", "reference.path",
)


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _jsonable(value):
    """JSON-ready copy: ConfigDicts and mappings -> dicts, tuples -> lists (as they come back from JSON, so
    a fingerprint compares equal after a roundtrip), numpy scalars -> Python, anything else -> str."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def config_fingerprint(config, *, model_config: Any = None, vocab_size: int | None = None) -> dict[str, Any]:
    """The dict to store as meta["fingerprint"] and pass back as `expected_meta_fingerprint` on resume.

    `config` is the run's ConfigDict (keys missing from it are skipped); `model_config` (a dataclass or
    dict: the architecture) and `vocab_size` catch a different model behind the same path.
    """
    fingerprint: dict[str, Any] = {}
    for key in RESUME_CRITICAL_KEYS:
        try:
            fingerprint[key] = _jsonable(_lookup(config, key))
        except (KeyError, AttributeError):
            continue
    if model_config is not None:
        if dataclasses.is_dataclass(model_config):
            model_config = dataclasses.asdict(model_config)
        fingerprint["model_config"] = _jsonable(model_config)
    if vocab_size is not None:
        fingerprint["vocab_size"] = int(vocab_size)
    return fingerprint


def fingerprint_differences(saved: Mapping, expected: Mapping) -> list[str]:
    """Human-readable lines `key: checkpoint=<a> now=<b>` for every (dotted) key whose value differs."""
    saved_flat = _flatten_dict(_jsonable(saved))
    expected_flat = _flatten_dict(_jsonable(expected))
    missing = object()
    lines = []
    for key in sorted(set(saved_flat) | set(expected_flat)):
        a, b = saved_flat.get(key, missing), expected_flat.get(key, missing)
        if a != b:
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: checkpoint={show(a)} now={show(b)}")
    return lines


def _plain_path(path) -> str:
    """A tree path as `a/b/0`: orbax stores named tuples (optax states) as dicts and tuples as lists, so the
    saved tree and the live one only agree on the key names, not on the container types."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _structure_differences(saved_tree, abstract_storage) -> list[str]:
    """Compare the saved state's tree paths, shapes and dtypes against what this run will restore into."""
    saved = {_plain_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_plain_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_storage)[0]}
    lines = [f"state/{k}: only in the checkpoint" for k in sorted(set(saved) - set(wanted))]
    lines += [f"state/{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
    for key in sorted(set(saved) & set(wanted)):
        shape_a, shape_b = tuple(getattr(saved[key], "shape", ())), tuple(wanted[key].shape)
        dtype_a, dtype_b = getattr(saved[key], "dtype", None), wanted[key].dtype
        if shape_a != shape_b or (dtype_a is not None and np.dtype(dtype_a) != np.dtype(dtype_b)):
            lines.append(f"state/{key}: checkpoint {dtype_a}{list(shape_a)} vs now {dtype_b}{list(shape_b)}")
    return lines


def _all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process, so all hosts fall back to the same step together."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _short_reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# ----- the manager ------------------------------------------------------------------------------------

class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the newest `keep`, restores the newest good one.

    Call `close()` (or use as a context manager) before the process exits so a pending async save commits.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, save_every: int, async_save: bool = True):
        if keep < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1 (got {keep}): a resume needs at least one")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            # A SIGKILLed async save leaves `<step>.orbax-checkpoint-tmp-*`; never listed as a step, and
            # removed here so it cannot fill the disk over many preemptions.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Handlers named up front: a fresh process (a resume) must read metadata before its first save.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler(),
                    _LAYOUT: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving --

    def should_save(self, step: int) -> bool:
        """True on multiples of `save_every` (never when save_every <= 0) unless that step is already saved."""
        if self.save_every <= 0 or step % self.save_every:
            return False
        return step not in self.all_steps()

    def save(self, step: int, state, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` (jax arrays, maybe sharded) and `meta` (JSON) as `step`; returns whether it did.

        Asynchronous: the arrays are copied off the device before this returns (so the caller may donate
        them to the next step), the files are written in the background; `wait()` blocks until committed.
        `force` saves off-schedule (end of training, preemption); a step already on disk is never rewritten.
        """
        if step in self.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        storage, key_impls = _keys_to_data(state)
        layout = {"key_impls": key_impls, "jaxdpo_version": _jaxdpo_version()}
        self._manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(storage),
                _META: ocp.args.JsonSave(_jsonable(dict(meta))),
                _LAYOUT: ocp.args.JsonSave(layout),
            }),
            force=True,  # the schedule is decided above; orbax's own policy would second-guess it
        )
        return True

    def wait(self) -> None:
        """Block until every started save is committed (renamed from its tmp dir) and old ones rotated out."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- listing and restoring --

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (tmp dirs of interrupted saves are not steps)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def resumable_step(self) -> int | None:
        """The newest committed step if every process sees one, else None: lets a run decide, before it
        builds anything, whether it will resume (and so need not build a fresh state). Lists the
        directory only; whether the step is readable is `restore_latest`'s business."""
        step = self.latest_step()
        return step if _all_processes_agree(step is not None) else None

    def restore_latest(self, abstract_state, *, expected_meta_fingerprint: Mapping | None = None):
        """Restore the newest readable step onto the shardings in `abstract_state`; None if there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set for the current mesh
        (typed PRNG keys included), so a checkpoint written on 8 devices restores onto 4 or 1.
        Returns `(step, state, meta)`. A damaged step is skipped with a `CorruptCheckpointWarning`.
        Raises ConfigError when the checkpoint belongs to a different run (fingerprint or state layout
        differs), or when steps exist but none can be read.
        """
        self._manager.wait_until_finished()  # our own pending save, if any, is part of the history
        self._manager.reload()  # another process (the killed run) may have written since we opened
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                restored, reason = self._try_restore(step, abstract_state, expected_meta_fingerprint)
            except ConfigError:  # a refused resume exits at once: let orbax's threads finish first
                self.close()
                raise
            if _all_processes_agree(reason is None):
                return restored
            reason = reason or "another process could not read it"
            failures.append(f"step {step}: {reason}")
            older = "trying the previous one" if step != steps[0] else "no older checkpoint left"
            warnings.warn(
                f"checkpoint step {step} in {self.directory} is unreadable ({reason}); {older}",
                CorruptCheckpointWarning, stacklevel=2)
        if failures:
            raise ConfigError(
                f"{self.directory} has checkpoints but none can be restored:\n  " + "\n  ".join(failures)
                + "\nMove the workdir aside (or delete its checkpoints/) to start fresh.")
        return None

    def read(self, step: int) -> tuple[Any, dict]:
        """(state, meta) of one step as saved, on the first local device, with no target structure needed
        (named tuples come back as dicts, PRNG keys as their key data): for tools and tests."""
        saved_tree = self._manager.item_metadata(step)[_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                                saved_tree)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}))
        return restored[_STATE], dict(restored[_META])

    def _try_restore(self, step: int, abstract_state, expected_fingerprint):
        """((step, state, meta), None) on success, (None, reason) if the step is damaged; raises on mismatch."""
        try:
            small = self._manager.restore(step, args=ocp.args.Composite(**{
                _META: ocp.args.JsonRestore(), _LAYOUT: ocp.args.JsonRestore()}))
            meta, layout = dict(small[_META]), dict(small[_LAYOUT])
            saved_tree = self._manager.item_metadata(step)[_STATE]
            saved_tree = getattr(saved_tree, "tree", saved_tree)
        except Exception as error:  # orbax raises many types for missing/garbled files
            return None, f"metadata: {_short_reason(error)}"
        if saved_tree is None:
            return None, "metadata: the state item has no readable metadata"

        if expected_fingerprint is not None:
            saved, expected = dict(meta.get(FINGERPRINT_KEY, {})), dict(expected_fingerprint)
            if identity.FINGERPRINT_KEY in expected:  # changed data: one line naming the file
                identity.check_unchanged(saved.pop(identity.FINGERPRINT_KEY, None),
                                         expected.pop(identity.FINGERPRINT_KEY), where=f"{self.directory} (step {step})")
            diffs = fingerprint_differences(saved, expected)
            if diffs:
                raise ConfigError(
                    f"cannot resume from {self.directory} (step {step}): it was written by a run with a different "
                    f"model or an incompatible config:\n  " + "\n  ".join(diffs)
                    + "\nUse a fresh workdir (or restore the original config).")
        abstract_storage = _abstract_for_storage(abstract_state)
        diffs = _structure_differences(saved_tree, abstract_storage)
        if diffs:
            raise ConfigError(
                f"cannot resume from {self.directory} (step {step}): the saved state does not match this run's "
                f"model/optimizer:\n  " + "\n  ".join(diffs[:20])
                + ("\n  ..." if len(diffs) > 20 else "") + "\nUse a fresh workdir (or restore the original config).")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract_storage)}))[_STATE]
            jax.block_until_ready(restored)
        except Exception as error:
            return None, f"state: {_short_reason(error)}"
        state = _data_to_keys(restored, abstract_state, layout.get("key_impls", {}), step)
        return (step, state, meta), None


def abstract_like(state):
    """The pytree of ShapeDtypeStruct (with shardings) that `restore_latest` takes, from live arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


# ----- preemption -------------------------------------------------------------------------------------

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
        """Put back the handlers from before (a Trainer run inside a larger program, e.g. a test session)."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def preempted(step: int | None = None) -> bool:
        local = flag.is_set()
        if jax.process_count() == 1:
            return local
        if step is not None and _reached_preemption_sync_point(step):
            local = True
        return not _all_processes_agree(not local)  # any process preempted -> all stop together

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
