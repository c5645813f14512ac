"""Checkpoints that survive preemption: orbax, async, rotation, restore onto any mesh, corrupt-step fallback.

A checkpoint step directory holds three orbax items:
  state  -- the pytree of jax arrays ({params, opt_state, step, bad_steps}), saved sharded as it lives on
            the mesh and restored onto whatever shardings the *current* run asks for (8 devices -> 4 -> 1);
  meta   -- a JSON dict from the training loop (data position, config fingerprint, metrics window, model
            and tokenizer paths, LoRA settings);
  layout -- a JSON dict this module writes for itself (the jaxdpo version that wrote the step).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when every file is on disk,
so a save interrupted by SIGKILL is never listed as a step; leftovers are removed when a manager opens.
A committed step can still be damaged later (a disk filled up, a file truncated by a copy, flipped bytes):
`layout` also holds a checksum of every state leaf (jaxdpo/checkpoint/checksums.py), compared with what a restore
read. Restoring tries the newest step first; a damaged one is reported in one warning line and moved
aside to `damaged/<step>-<time>` (no longer a step: never kept by rotation, never restored, and the
resumed run saves that step again), then the next older one is tried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdpo.checkpoint.checksums import checksum_differences, state_checksums
from jaxdpo.checkpoint.fingerprint import (
    FINGERPRINT_KEY,
    fingerprint_differences,
    jsonable,
)
from jaxdpo.data import identity
from jaxdpo.errors import ConfigError, DamagedFileWarning
from jaxdpo.parallel.distributed import all_processes_agree

_STATE, _META, _LAYOUT = "state", "meta", "layout"


_CHECKSUMS = "checksums"  # layout[_CHECKSUMS]: {state leaf path: checksum}
DAMAGED_DIR = "damaged"  # where damaged steps are moved: <directory>/damaged/<step>-<time>


class CorruptCheckpointWarning(DamagedFileWarning):
    """A committed checkpoint step could not be read (or its checksums differ); an older step is used."""


def _jaxdpo_version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxdpo")
    except Exception:  # not installed as a distribution (running from a source tree)
        return "unknown"


# ----- compatibility checks ---------------------------------------------------------------------------

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


def _structure_differences(saved_tree, abstract_state) -> list[str]:
    """Compare the saved state's tree paths, shapes and dtypes against what this run will restore into."""
    saved = {_plain_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_plain_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    lines = [f"state/{k}: only in the checkpoint" for k in sorted(set(saved) - set(wanted))]
    lines += [f"state/{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
    for key in sorted(set(saved) & set(wanted)):
        shape_a, shape_b = tuple(getattr(saved[key], "shape", ())), tuple(wanted[key].shape)
        dtype_a, dtype_b = getattr(saved[key], "dtype", None), wanted[key].dtype
        if shape_a != shape_b or (dtype_a is not None and np.dtype(dtype_a) != np.dtype(dtype_b)):
            lines.append(f"state/{key}: checkpoint {dtype_a}{list(shape_a)} vs now {dtype_b}{list(shape_b)}")
    return lines


def _short_reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _run_coroutine(coroutine):
    """Run an orbax coroutine to completion from synchronous code, even under a running event loop
    (a notebook): in a thread of its own, with a loop of its own."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


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
            cleanup_tmp_directories=False,  # done below, synchronously
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Handlers named up front: a fresh process (a resume) must read metadata before its first save.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler(),
                    _LAYOUT: ocp.JsonCheckpointHandler()}
        # A SIGKILLed async save leaves `<step>.orbax-checkpoint-tmp-*`: never listed as a step, and removed
        # here so it cannot fill the disk over many preemptions. Orbax's own cleanup runs in a thread that
        # nothing waits for, so a run that stops early (a one-line error) exited under it and printed a
        # traceback from that thread; this one is done before the constructor returns.
        _run_coroutine(ocp.path.step.temporary_paths.cleanup_temporary_paths(
            self.directory, multiprocessing_options=options.multiprocessing_options))
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
        # Checksums before orbax takes the arrays: the caller may donate them once save() returns.
        layout = {"jaxdpo_version": _jaxdpo_version(), _CHECKSUMS: state_checksums(state, _plain_path)}
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(jsonable(dict(meta))),
            _LAYOUT: ocp.args.JsonSave(layout),
        })
        try:  # orbax first waits for the previous async save: its write error surfaces here too
            # force: the schedule is decided above; orbax's own policy would second-guess it
            self._manager.save(step, args=args, force=True)
        except Exception as error:
            raise self._write_error(error) from None
        return True

    def wait(self) -> None:
        """Block until every started save is committed (renamed from its tmp dir) and old ones rotated out.
        A save that could not be written (disk full, read-only) is a ConfigError naming the directory."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(error) from None

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def _write_error(self, error: BaseException) -> ConfigError:
        """One line for a save that failed: the directory, orbax's reason, what to do, what is intact."""
        self._manager.reload()
        intact = self.latest_step()
        kept = f"checkpoint step {intact} is intact" if intact is not None else "no checkpoint was kept"
        # tensorstore's message names every path on the way; its last part is the OS error (No space left...)
        reason = " ".join(str(error).split()).rsplit(": ", 1)[-1]
        return ConfigError(f"could not write a checkpoint in {self.directory} ({reason}); {kept}. "
                           f"Free space there (or point --config.workdir at a disk with room), then rerun the "
                           f"same command to resume")

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
        return step if all_processes_agree(step is not None) else None

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
            if all_processes_agree(reason is None):
                return restored
            reason = reason or "another process could not read it"
            failures.append(f"step {step}: {reason}")
            moved = self._move_aside(step)
            older = "trying the previous one" if step != steps[0] else "no older checkpoint left"
            warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); moved to "
                          f"{moved}; {older}", CorruptCheckpointWarning, stacklevel=2)
        if failures:
            raise ConfigError(
                f"{self.directory} had checkpoints but none can be restored (each was moved to "
                f"{os.path.join(self.directory, DAMAGED_DIR)}): " + "; ".join(failures)
                + ". Rerun to start from model.path, or use a fresh workdir.")
        return None

    def _move_aside(self, step: int) -> str:
        """Move a damaged step to damaged/<step>-<time>: it stops being a step (rotation neither keeps it
        nor deletes a good older one for it; the resumed run saves that step again) but is not deleted."""
        target = os.path.join(self.directory, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        all_processes_agree(True)  # every process waits for the move before listing the steps again
        self._manager.reload()
        return target

    def read_meta(self, step: int) -> dict:
        """The meta dict of one step (no array is read)."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META])

    def read(self, step: int) -> tuple[Any, dict]:
        """(state, meta) of one step as saved, on the first local device, with no target structure needed
        (named tuples come back as dicts, PRNG keys as their key data): for tools and tests."""
        saved_tree = self._manager.item_metadata(step)[_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                                saved_tree)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore(),
            _LAYOUT: ocp.args.JsonRestore()}))
        damaged = _checksum_mismatch(restored[_LAYOUT], restored[_STATE])
        if damaged:
            raise ConfigError(f"checkpoint step {step} in {self.directory} is damaged ({damaged}); "
                              f"use another step or rerun training to replace it")
        return restored[_STATE], dict(restored[_META])

    def _try_restore(self, step: int, abstract_state, expected_fingerprint):
        """((step, state, meta), None) on success, (None, reason) if the step is damaged; raises on mismatch."""
        try:
            small = self._manager.restore(step, args=ocp.args.Composite(**{
                _META: ocp.args.JsonRestore(), _LAYOUT: ocp.args.JsonRestore()}))
            meta, layout = dict(small[_META]), small[_LAYOUT]
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
        diffs = _structure_differences(saved_tree, abstract_state)
        if diffs:
            raise ConfigError(
                f"cannot resume from {self.directory} (step {step}): the saved state does not match this run's "
                f"model/optimizer:\n  " + "\n  ".join(diffs[:20])
                + ("\n  ..." if len(diffs) > 20 else "") + "\nUse a fresh workdir (or restore the original config).")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract_state)}))[_STATE]
            jax.block_until_ready(restored)
        except Exception as error:
            return None, f"state: {_short_reason(error)}"
        damaged = _checksum_mismatch(layout, restored)
        if damaged:
            return None, damaged
        return (step, restored, meta), None


def _checksum_mismatch(layout, restored, *, partial: bool = False) -> str | None:
    """Why the restored state is not what was saved (its checksums differ), or None. `partial`: `restored`
    holds only some of the state (e.g. {"params"}); only those leaves are compared. Steps written before
    checksums existed carry none and pass."""
    saved = (layout or {}).get(_CHECKSUMS)
    if saved is None:
        return None
    now = state_checksums(restored, _plain_path)
    if partial:
        saved = {k: v for k, v in saved.items() if k.split("/")[0] in restored}
    differing = checksum_differences(saved, now)
    if not differing:
        return None
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    return f"checksum mismatch in state/{', state/'.join(differing[:3])}{more}"


def abstract_like(state):
    """The pytree of ShapeDtypeStruct (with shardings) that `restore_latest` takes, from live arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def check_restored(layout, restored: dict, where: str) -> None:
    """A ConfigError naming `where` if the leaves in `restored` (a part of the state, e.g. {"params": ...})
    differ from the checksums in the step's `layout` item: a damaged checkpoint never reaches an export."""
    damaged = _checksum_mismatch(layout, restored, partial=True)
    if damaged:
        raise ConfigError(f"{where} is damaged ({damaged}); use another step or rerun training to replace it")


def newest_meta_on_disk(directory: str) -> dict | None:
    """The `meta` item of the newest committed step under `directory`, read as the plain JSON file orbax
    writes, without opening a manager (which would clean the directory, and may need jax.distributed): what
    a run reads before anything starts, e.g. the hub commits to pin. None when there is no readable one."""
    import json

    try:
        steps = sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)
    except OSError:
        return None
    for step in steps:
        try:
            with open(os.path.join(directory, str(step), _META, "metadata")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None
