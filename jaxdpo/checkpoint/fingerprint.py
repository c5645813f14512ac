"""The config fingerprint: what must match for a checkpoint to be resumed by this run.

A checkpoint's meta holds `meta[FINGERPRINT_KEY]`, the values of the config keys that change the past
(data order and content, objective, optimizer, model architecture); a resume compares it with the
current run's and refuses, listing every difference, when they differ. Keys that change only the future
(learning rate and schedule, steps, cadences, the bad-step limit, mesh, remat, paths of caches) may change
between a run and its resume; `setting_changes` lists the ones of RESUME_ADJUSTABLE_KEYS that did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdpo.preference import loss_specs

FINGERPRINT_KEY = "fingerprint"  # meta[FINGERPRINT_KEY]: the dict that must match for a resume to be valid


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
# optimizer (every `loss` key: `loss_specs.CONFIG_KEYS`, from the loss registry; flattened like a saved
# nested "loss" section, so older checkpoints still compare key by key). The data files are compared by content (`jaxdpo.data.identity`), not by path. Left out on purpose: mesh/devices (restore reshards), train.steps/epochs (extending a run),
# logging/eval/save cadence, remat/attention/chunking (same math), paths of caches and the workdir.
RESUME_CRITICAL_KEYS = (
    "seed", "model.dtype", "model.param_dtype", "model.tokenizer",
    "lora.rank", "lora.alpha", "lora.dropout", "lora.targets", "lora.base_dtype",
    "data.eval_fraction", "data.prompt_key", "data.chosen_key",
    "data.rejected_key", "data.chat_template", "data.max_length", "data.max_prompt_length", "data.truncation",
    "data.layout", "data.on_bad_row", "data.max_samples", "data.completion_key", "data.label_key", "data.shuffle",
    "data.completions_key", "data.scores_key",
    *loss_specs.CONFIG_KEYS, "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.grad_clip",
    "train.batch_size", "reference.mode", "reference.path", "objective", "reward_model.center_rewards_coefficient",
)

# Config keys that change only what comes next: a resume may change them. The checkpoint records their
# values (meta[SETTINGS_KEY]) so a resume can say what changed, in the log and in metrics.jsonl. The
# learning rate and schedule shape the updates still to come (the optimizer's moments do not depend on
# them); the other optim keys stay in RESUME_CRITICAL_KEYS (the moments' meaning, the state's layout).
RESUME_ADJUSTABLE_KEYS = (
    "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "train.steps", "train.epochs",
    "train.log_every", "train.eval_every", "train.save_every", "train.max_bad_steps",
)
SETTINGS_KEY = "settings"


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def jsonable(value):
    """JSON-ready copy: ConfigDicts and mappings -> dicts, tuples -> lists (as they come back from JSON, so
    a fingerprint compares equal after a roundtrip), numpy scalars -> Python, anything else -> str."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def config_fingerprint(config, *, model_config: Any = None, vocab_size: int | None = None,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict to store as meta["fingerprint"] and pass back as `expected_meta_fingerprint` on resume.

    `config` is the run's ConfigDict (keys missing from it are skipped); `model_config` (a dataclass or
    dict: the architecture) and `vocab_size` catch a different model behind the same path; `overrides`
    replaces config values by what the run resolved them to (reference.mode: the reference it built).
    """
    fingerprint: dict[str, Any] = {}
    for key in RESUME_CRITICAL_KEYS:
        try:
            fingerprint[key] = jsonable(_lookup(config, key))
        except (KeyError, AttributeError):
            continue
    for key, value in (overrides or {}).items():
        fingerprint[key] = jsonable(value)
    if model_config is not None:
        if dataclasses.is_dataclass(model_config):
            model_config = dataclasses.asdict(model_config)
        fingerprint["model_config"] = jsonable(model_config)
    if vocab_size is not None:
        fingerprint["vocab_size"] = int(vocab_size)
    return fingerprint


# Keys a checkpoint's fingerprint may lack because it was written before they existed, with the value such a
# run had: a saved fingerprint without one matches a config holding that value.
IMPLIED_WHEN_ABSENT = {"objective": "preference", "reward_model.center_rewards_coefficient": 0.0,
                       "data.shuffle": True, "data.completion_key": "completion", "data.label_key": "label",
                       "loss.desirable_weight": 1.0, "loss.undesirable_weight": 1.0, "lora.base_dtype": "none",
                       "loss.group": "", "data.completions_key": "completions", "data.scores_key": "scores",
                       "online.pairs": "best_worst"}


def fingerprint_differences(saved: Mapping, expected: Mapping) -> list[str]:
    """Human-readable lines `key: checkpoint=<a> now=<b>` for every (dotted) key whose value differs."""
    expected_flat = _flatten_dict(jsonable(expected))
    implied = {k: v for k, v in IMPLIED_WHEN_ABSENT.items() if k in expected_flat}  # keys this fingerprint holds
    saved_flat = {**implied, **_flatten_dict(jsonable(saved))}
    missing = object()
    lines = []
    for key in sorted(set(saved_flat) | set(expected_flat)):
        a, b = saved_flat.get(key, missing), expected_flat.get(key, missing)
        if a != b:
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: checkpoint={show(a)} now={show(b)}")
    return lines


def adjustable_settings(config) -> dict[str, Any]:
    """{key: value} of RESUME_ADJUSTABLE_KEYS, as a checkpoint's meta[SETTINGS_KEY] records them."""
    settings = {}
    for key in RESUME_ADJUSTABLE_KEYS:
        try:
            settings[key] = jsonable(_lookup(config, key))
        except (KeyError, AttributeError):
            continue
    return settings


def setting_changes(saved: Mapping | None, now: Mapping) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint value, value now)} of the adjustable keys a resume changed (none for checkpoints
    that recorded no settings)."""
    saved = saved or {}
    return {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
