"""LoRA adapters on the stacked decoder: settings from config, adapter params, PEFT export, merging.

A target projection W (stacked [layers, in..., out...]) gets A [layers, in..., r] and B [layers, r, out...],
stored on the LayerStack as `{target}_lora_a` / `{target}_lora_b` with the variable type `LoRAParam`
(a Decoder built with `lora=LoRASettings(...)` has them: `jaxdpo.models.decoder`), so they scan with the
base weights and `decoder_layer` adds (alpha / r) * (x A) B to x W. B starts at zero, so a fresh adapter
leaves the model exactly as it was. The training build splits the model with `LoRAParam`:
the adapters train (and alone get optimizer state and checkpoints), the base weights stay frozen, and the
reference is the same forward with the adapters zeroed (reference.mode = "lora_base").

QLoRA (lora.base_dtype = int8 | nf4): `quantize_base` replaces each target's frozen weight by its quantized
codes and block scales (jaxdpo.models.quantize) right after loading; the forward dequantizes them layer by
layer, the adapters, norms and embeddings stay in model.param_dtype. Merging dequantizes the base first.

Adapter dropout (lora.dropout = p) follows PEFT: only the adapter's input is dropped, x W + (alpha / r)
(dropout(x) A) B, with kept units scaled by 1 / (1 - p), and only in the policy's training forward.
The rate is a static field of the Decoder's settings (like the scale); the masks come from a key the train
step derives from (seed, step, micro-batch), so they need no RNG state and a resumed run draws the same.

Export follows PEFT: `adapter_config.json` + `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.errors import ConfigError
from jaxdpo.models import families, quantize
from jaxdpo.models.decoder import (  # noqa: F401
    PROJECTIONS,
    Decoder,
    LoRAParam,
    LoRASettings,
    adapter_specs,
    layer_param_specs,
)
from jaxdpo.parallel.sharding import gather_to_host

TARGETS = tuple(PROJECTIONS)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_settings(lora_cfg) -> LoRASettings | None:
    """The `lora` config block -> settings, or None when LoRA is off (rank 0). ConfigError when invalid."""
    rank = lora_cfg.rank
    dropout = lora_cfg.dropout
    base_dtype = lora_cfg.get("base_dtype", "none")
    if quantize.format_named(base_dtype) is not None and rank == 0:
        raise ConfigError(f"lora.base_dtype = {base_dtype} quantizes the frozen base of LoRA, but lora.rank = 0 "
                          f"trains every weight: set lora.rank > 0 (e.g. 16) or lora.base_dtype = none")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout = {dropout!r} must be a number in [0, 1): the probability of dropping "
                          f"an adapter input unit while training (0 = off; PEFT users often set 0.05 or 0.1)")
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"lora.rank = {rank!r} must be a non-negative integer (0 = LoRA off, full fine-tuning)")
    if rank == 0:
        return None
    if lora_cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha = {lora_cfg.alpha} must be positive (the update is scaled by alpha / rank)")
    raw = lora_cfg.targets
    names = [t.strip() for t in raw.split(",")] if isinstance(raw, str) else [str(t).strip() for t in raw]
    names = [t for t in names if t]
    if names == ["all-linear"]:
        names = list(TARGETS)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ConfigError(f"lora.targets = {raw!r}: {', '.join(unknown) or 'empty'} is not a projection; use "
                          f"names from {', '.join(TARGETS)} (comma-separated) or 'all-linear'")
    return LoRASettings(rank=rank, alpha=float(lora_cfg.alpha), targets=tuple(t for t in TARGETS if t in names),
                        dropout=float(dropout), base_dtype=base_dtype)


def check_config(config) -> bool:
    """The `lora` section (ConfigError when invalid); whether LoRA is on. A config without one: off."""
    return "lora" in config and lora_settings(config.lora) is not None


def quantized_specs(config, settings: LoRASettings) -> dict:
    """`{target}_codes` / `{target}_scales` -> (shape, logical axes, dtype) of the quantized frozen targets
    (empty when the base is not quantized). ConfigError when a contracted size does not fit the blocks."""
    fmt = quantize.format_named(settings.base_dtype)
    if fmt is None:
        return {}
    weights = {t: layer_param_specs(config)[t] for t in settings.targets}
    quantize.check_blocks(weights, PROJECTIONS, settings.base_dtype)
    specs = {}
    for target, (shape, logical) in weights.items():
        specs.update(quantize.stored_specs(target, shape, logical, fmt, PROJECTIONS[target]))
    return specs


def quantize_base(model: Decoder, settings: LoRASettings, mesh) -> Decoder:
    """`model` (loaded, with the adapters of `settings`) with each target's frozen weight replaced, in place, by
    its quantized codes and block scales placed on `mesh` as the weight was (settings.base_dtype; a base that
    stays float is returned untouched)."""
    fmt = quantize.format_named(settings.base_dtype)
    if fmt is None:
        return model
    quantized_specs(model.config, settings)  # the block check, before any work
    for target in settings.targets:
        logical = layer_param_specs(model.config)[target][1]
        weight = getattr(model.layers, target)[...]
        codes, scales = quantize.quantize_placed(weight, fmt, PROJECTIONS[target], logical, mesh)
        del weight
        model.layers.hold_quantized(target, codes, scales)
    return model


def _float_layers(model: Decoder) -> dict:
    """The stacked layer weights of `model` as float arrays (a quantized base dequantized, fp32)."""
    layers = model.layers.arrays()
    for name in layer_param_specs(model.config):
        if name not in layers:
            codes, scales = layers.pop(f"{name}_codes"), layers.pop(f"{name}_scales")
            layers[name] = quantize.dequantize(codes, scales, PROJECTIONS[name], model.param_dtype)
    return layers


def merged_weight(weight, lora_a, lora_b, scale: float, target: str):
    """W + scale * A B for one stacked target, in W's dtype (products in float32)."""
    k = PROJECTIONS[target]
    ins, outs = "ijk"[:k], "xyz"[:weight.ndim - 1 - k]
    delta = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
    return (weight.astype(jnp.float32) + scale * delta).astype(weight.dtype)


@functools.partial(jax.jit, static_argnames="settings")
def fold_adapters(adapter_layers: dict, base_layers: dict, settings: LoRASettings) -> dict:
    """The stacked layer weights of a base with the adapters folded in, stored as the base was: each target
    W + scale A B (products in float32); a quantized base is dequantized to float32, added to and quantized
    again (one more rounding of its format per fold). Every other layer weight is passed through."""
    fmt = quantize.format_named(settings.base_dtype)
    folded = dict(base_layers)
    for target in settings.targets:
        axis = PROJECTIONS[target]
        if fmt is None:
            weight = base_layers[target]
        else:
            weight = quantize.dequantize(base_layers[f"{target}_codes"], base_layers[f"{target}_scales"], axis,
                                         jnp.float32)
        merged = merged_weight(weight, adapter_layers[f"{target}_lora_a"], adapter_layers[f"{target}_lora_b"],
                               settings.scale, target)
        if fmt is None:
            folded[target] = merged
        else:
            folded[f"{target}_codes"], folded[f"{target}_scales"] = quantize.quantize(merged, fmt, axis)
    return folded


def merge_adapters(model: Decoder, settings: LoRASettings) -> Decoder:
    """A Decoder without adapters whose target weights have them folded in (`model` is untouched). A
    quantized base is dequantized first (into model.param_dtype): the merged weights are W' + scale A B with
    W' the dequantized W, not the original checkpoint's W."""
    plain = nnx.eval_shape(lambda: Decoder(model.config, dtype=model.dtype, param_dtype=model.param_dtype,
                                           remat=model.remat, attention_backend=model.attention_backend,
                                           rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(plain)
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = _float_layers(model)
    for target in settings.targets:
        layers[target] = merged_weight(layers[target], layers[f"{target}_lora_a"], layers[f"{target}_lora_b"],
                                       settings.scale, target)
    values["layers"] = {name: layers[name] for name in layer_param_specs(model.config)}
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def peft_tensors(model: Decoder, settings: LoRASettings) -> dict[str, np.ndarray]:
    """PEFT's key -> array ([r, in] for lora_A, [out, r] for lora_B, torch Linear layout), per layer.
    Every process must call this (sharded adapters are gathered)."""
    key_map = families.layer_key_map(model.config)
    out = {}
    for target in settings.targets:
        a = gather_to_host(getattr(model.layers, f"{target}_lora_a")[...])
        b = gather_to_host(getattr(model.layers, f"{target}_lora_b")[...])
        module = "base_model.model." + key_map[target].removesuffix(".weight")
        for i in range(model.config.num_layers):
            prefix = module.format(i=i)
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, settings.rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(settings.rank, -1).T)
    return out


def save_adapter(model: Decoder, settings: LoRASettings, out_dir: str, *, base_model: str,
                 tokenizer=None) -> None:
    """Write the adapter in PEFT format (loadable by `peft.PeftModel.from_pretrained(base, out_dir)`).
    Every process must call this; only process 0 writes."""
    from safetensors.numpy import save_file

    from jaxdpo.models.hf_io import staged_dir

    tensors = peft_tensors(model, settings)
    if jax.process_index() != 0:
        return
    with staged_dir(out_dir) as staging:  # a failed write leaves the previous adapter, never a partial one
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": list(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None,
        }
        with open(os.path.join(staging, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
