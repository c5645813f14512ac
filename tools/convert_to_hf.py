"""Turn a jaxdpo training checkpoint into a Hugging Face model directory that transformers loads.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--step N] [--tokenizer DIR] [--dtype bfloat16]

CHECKPOINT is a run's WORKDIR, its WORKDIR/checkpoints, or one step directory in it (default: the newest
step). Only the policy params are read (not the optimizer state), onto one device, so a checkpoint of a
run sharded over a pod converts on a laptop if the weights fit in its memory. The architecture comes from
the checkpoint's own meta (the run's fingerprint holds the ModelConfig), so the original model directory
is not needed for a full fine-tune. A LoRA run's checkpoint holds only the adapters: they are merged into
the base weights read from the run's model.path (recorded in the meta; `--base DIR` overrides it).

The tokenizer is copied from `--tokenizer`, else WORKDIR/hf (the run's own export), else the run's
model.tokenizer / model.path; without any, the model is written alone (with a warning).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a script: make `jaxdpo` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxdpo.fingerprint import FINGERPRINT_KEY
from jaxdpo.config import ConfigError
from jaxdpo.models import Decoder, ModelConfig, save_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
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
    finally:
        manager.close()
    return _strip_variable_level(restored["params"]), meta


def build_model(params: dict, meta: dict, *, base: str | None = None) -> Decoder:
    """The policy as a Decoder: a fresh (abstract) one filled with the params, or for LoRA the base model
    with the adapters merged in."""
    fingerprint = meta.get(FINGERPRINT_KEY) or {}
    architecture = fingerprint.get("model_config")
    if not isinstance(architecture, dict):
        raise ConfigError("the checkpoint's meta has no model architecture (meta['fingerprint']['model_config']); "
                          "it was not written by jaxdpo's training loop")
    config = _model_config(architecture)
    param_dtype = DTYPES[fingerprint.get("model.param_dtype") or fingerprint.get("param_dtype") or "float32"]
    lora = meta.get("lora") or fingerprint.get("lora")
    if not lora:
        model = nnx.eval_shape(lambda: Decoder(config, dtype=param_dtype, param_dtype=param_dtype,
                                               rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    from jaxdpo.models import from_pretrained, load_config
    from jaxdpo.models.lora import LoRAParam, LoRASettings, merge_adapters

    base = base or meta.get("model_path")
    if not base or not os.path.isdir(base):
        raise ConfigError(f"this is a LoRA checkpoint (only adapters are saved); its base model directory "
                          f"{base!r} is not available here: pass --base DIR (the run's model.path)")
    if load_config(base) != config:
        raise ConfigError(f"--base {base} is not the architecture this LoRA checkpoint was trained on")
    settings = LoRASettings(rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=tuple(lora["targets"]))
    model = from_pretrained(base, dtype=param_dtype, lora=settings)
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    nnx.replace_by_pure_dict(adapters, params)
    return merge_adapters(nnx.merge(graphdef, adapters, rest), settings)


def find_tokenizer(workdir: str, meta: dict, explicit: str | None):
    """The tokenizer to copy next to the weights (see the module docstring for the order), or None."""
    from transformers import AutoTokenizer

    if explicit:
        return AutoTokenizer.from_pretrained(explicit)
    candidates = [os.path.join(workdir, "hf"), meta.get("tokenizer_path"), meta.get("model_path")]
    for candidate in candidates:
        if candidate and any(os.path.exists(os.path.join(candidate, f)) for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(candidate)
    return None


def convert(checkpoint: str, out_dir: str, *, step: int | None = None, tokenizer: str | None = None,
            base: str | None = None, dtype: str | None = None) -> int:
    """Write OUT_DIR; returns the step converted."""
    checkpoints_dir, step, workdir = locate(checkpoint, step)
    params, meta = read_params(checkpoints_dir, step)
    model = build_model(params, meta, base=base)
    tok = find_tokenizer(workdir, meta, tokenizer)
    if tok is None:
        print("convert_to_hf: no tokenizer found (pass --tokenizer DIR); writing the model without one",
              file=sys.stderr)
    save_pretrained(model, out_dir, tokenizer=tok, dtype=DTYPES[dtype] if dtype else None)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="WORKDIR, WORKDIR/checkpoints, or one step directory in it")
    parser.add_argument("out_dir", help="where to write config.json, *.safetensors and the tokenizer")
    parser.add_argument("--step", type=int, default=None, help="which step (default: the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: see above)")
    parser.add_argument("--base", default=None, help="LoRA runs: the base model directory (default: model.path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype on disk (default: the run's model.param_dtype)")
    args = parser.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax narrates read-only opens at WARNING; nothing to act on
    try:
        step = convert(args.checkpoint, args.out_dir, step=args.step, tokenizer=args.tokenizer, base=args.base,
                       dtype=args.dtype)
    except ConfigError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote step {step} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
