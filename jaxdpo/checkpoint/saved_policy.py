"""A trained policy read back from a jaxdpo run's checkpoint (for tools/convert_to_hf.py and jaxdpo.sample).

`locate` finds the step (a run's WORKDIR, its checkpoints/ or one step directory), `read_params` reads only
the policy params onto one device (the optimizer state stays on disk), `build_model` puts them into a
Decoder whose architecture comes from the checkpoint's own meta. A LoRA checkpoint holds only the adapters:
they are attached to the base weights read from the run's model.path (recorded in the meta), unmerged.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxdpo.checkpoint.fingerprint import FINGERPRINT_KEY
from jaxdpo.checkpoint.manager import check_restored
from jaxdpo.errors import ConfigError
from jaxdpo.models import Decoder, ModelConfig
from jaxdpo.models.config import DTYPES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def locate(path: str, step: int | None = None) -> tuple[str, int, str]:
    """(checkpoints dir, step, workdir) for a WORKDIR, a checkpoints dir, or a step dir."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a directory; give a run's WORKDIR, WORKDIR/checkpoints or a step in it")
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != int(base):
            raise ConfigError(f"{path} is step {base} but --step {step} was given; give one of them")
        return os.path.dirname(path), int(base), os.path.dirname(os.path.dirname(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = sorted(int(name) for name in os.listdir(path)
                   if name.isdigit() and os.path.isdir(os.path.join(path, name, "state")))
    if not steps:
        raise ConfigError(f"{path} holds no committed checkpoint step (directories named by step number with a "
                          f"state/ item); is it a jaxdpo run's WORKDIR or WORKDIR/checkpoints?")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"step {step} is not in {path}; available: {', '.join(map(str, steps))}")
    return path, step, os.path.dirname(path)


def _model_config(architecture: dict) -> ModelConfig:
    """ModelConfig from its JSON form (lists back to the tuples the dataclass holds)."""
    fields = dict(architecture)
    for key in ("layer_types", "eos_token_id"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def _strip_variable_level(tree):
    """Orbax stores each nnx Variable as {'value': array}; the pure dict nnx takes back has the array."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _strip_variable_level(v) for k, v in tree.items()}
    return tree


def read_params(checkpoints_dir: str, step: int) -> tuple[dict, dict]:
    """(params as a nested dict of arrays on one device, meta) of one step; the optimizer state stays on disk."""
    manager = ocp.CheckpointManager(
        checkpoints_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                       "layout": ocp.JsonCheckpointHandler()})
    try:
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if "params" not in saved:
            raise ConfigError(f"{checkpoints_dir}/{step}: the saved state has no 'params' (keys: {sorted(saved)}); "
                              f"not a jaxdpo training checkpoint")
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        wanted = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                                        sharding=one_device), saved["params"])}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=one_device), wanted)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
        layout = manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
        check_restored(layout, {"params": restored["params"]}, where=f"checkpoint step {step} in {checkpoints_dir}")
    finally:
        manager.close()
    return _strip_variable_level(restored["params"]), meta


def build_model(params: dict, meta: dict, *, base: str | None = None, dtype=None):
    """(the policy as a Decoder, its LoRASettings or None): a fresh (abstract) Decoder filled with the params,
    or for LoRA the base model with the adapters attached (not merged). `dtype` is the compute dtype
    (default: the run's param dtype, which the params keep)."""
    fingerprint = meta.get(FINGERPRINT_KEY) or {}
    architecture = fingerprint.get("model_config")
    if not isinstance(architecture, dict):
        raise ConfigError("the checkpoint's meta has no model architecture (meta['fingerprint']['model_config']); "
                          "it was not written by jaxdpo")
    config = _model_config(architecture)
    param_dtype = DTYPES[fingerprint.get("model.param_dtype") or "float32"]
    dtype = param_dtype if dtype is None else dtype
    lora = meta.get("lora")
    if not lora:
        model = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state), None

    from jaxdpo.models import from_pretrained, load_config
    from jaxdpo.models.decoder import LoRAParam, LoRASettings
    from jaxdpo.models.lora import quantize_base

    folded = meta.get("lora_rounds_in_base", 0)
    if folded and not base:
        raise ConfigError(f"these LoRA adapters were trained on model.path with {folded} earlier on-policy "
                          f"round(s)' adapters folded in, a base held in memory and not saved; sample the run's "
                          f"WORKDIR (its last round's export) instead, or pass --base DIR with that base")
    base = base or meta.get("model_path")
    if not base or not os.path.isdir(base):
        raise ConfigError(f"this is a LoRA checkpoint (only adapters are saved); its base model directory "
                          f"{base!r} is not available here: pass --base DIR (the run's model.path)")
    if load_config(base) != config:
        raise ConfigError(f"--base {base} is not the architecture this LoRA checkpoint was trained on")
    settings = LoRASettings(rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=tuple(lora["targets"]),
                            base_dtype=lora.get("base_dtype", "none"))
    model = quantize_base(from_pretrained(base, dtype=dtype, param_dtype=param_dtype, lora=settings), settings, None)
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    nnx.replace_by_pure_dict(adapters, params)
    return nnx.merge(graphdef, adapters, rest), settings


def find_tokenizer(workdir: str, meta: dict, explicit: str | None = None):
    """The run's tokenizer: `explicit`, else WORKDIR/hf (the run's own export), else the run's
    model.tokenizer / model.path; None when none of them has tokenizer files."""
    from transformers import AutoTokenizer

    if explicit:
        return AutoTokenizer.from_pretrained(explicit)
    candidates = [os.path.join(workdir, "hf"), meta.get("tokenizer_path"), meta.get("model_path")]
    for candidate in candidates:
        if candidate and any(os.path.exists(os.path.join(candidate, f)) for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(candidate)
    return None
