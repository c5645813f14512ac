"""Where the frozen reference model lives: `device` (a copy sharded like the policy) or `host`.

`host` keeps the reference params in pinned host memory with the policy's partition specs. The
reference forward brings the non-layer params (embedding, final norm, LM head) to the device when it
starts, and the stacked layer params one layer at a time inside the layer scan (the Decoder's
`layer_params_hook`), so the reference's device footprint is about one layer plus the embeddings
instead of a whole model.

On GPU/TPU, `jax.device_put(x, jax.memory.Space.Device)` inside jit lowers to a host-to-device copy
(XLA's `annotate_device_placement`; tests/test_scale.py checks the CUDA lowering has one per layer
param inside the scan). On CPU (jax 0.10) JAX lowers it to nothing (`_common_device_put_lowering`):
host and device memory are the same RAM and XLA:CPU has no memory-space transfers, so the scan reads
each layer straight from the `pinned_host` argument. The numbers are the same; only the copy is
elided, and XLA:CPU's memory analysis counts host arguments as ordinary arguments.
`reference_memory_report` therefore adds the compiled program's own host-memory entry parameters
(memory space S(5) in its HLO) and the reference's bytes per memory kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdpo.errors import ConfigError
from jaxdpo.step import StepFunctions

MODES_WITH_PARAMS = ("device", "host")
HOST_MEMORY_KIND = "pinned_host"


def _to_device(tree):
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def _to_memory_kind(sharding: NamedSharding, memory_kind: str) -> NamedSharding:
    return NamedSharding(sharding.mesh, sharding.spec, memory_kind=memory_kind)


def check_config(config, *, lora_on: bool) -> None:
    """The `reference` section against LoRA: what each mode loads and needs."""
    from jaxdpo.models.hf_io import check_checkpoint_dir

    mode = config.reference.mode
    if mode == "lora_base" and not lora_on:
        raise ConfigError("reference.mode = 'lora_base' needs LoRA: set lora.rank > 0 (e.g. 16), "
                          "or choose reference.mode device | host | cached")
    if config.reference.path:
        if mode in ("none", "lora_base"):
            raise ConfigError(f"reference.path = {config.reference.path!r} is set but reference.mode = "
                              f"{mode!r} loads no reference checkpoint; clear one of them")
        check_checkpoint_dir(config.reference.path, "reference.path")
        if lora_on:
            raise ConfigError(f"reference.path = {config.reference.path!r} with LoRA is not supported: the LoRA "
                              f"reference is the base model (reference.mode lora_base); clear reference.path")


def gives_logprobs(config, *, lora_on: bool) -> bool:
    """Whether the run's reference gives logprobs (reference-free losses need none)."""
    return config.reference.mode != "none"


def check_host_memory_supported(mesh) -> None:
    """reference.mode = host needs a backend with a pinned_host memory space (CPU, GPU and TPU have one)."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if HOST_MEMORY_KIND not in kinds:
        platform = mesh.devices.flat[0].platform
        raise ConfigError(f"reference.mode = host needs '{HOST_MEMORY_KIND}' memory, which {platform} devices "
                          f"do not offer (they have {sorted(kinds)}); use reference.mode = device")


def place_reference(params, mode: str):
    """A frozen copy of `params` placed for `mode`: same partition specs, device or pinned_host memory.

    Always a real copy: the policy's buffers are donated to the train step and change every update."""
    if mode == "device":
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
    if mode == "host":
        return jax.tree.map(
            lambda x: jax.device_put(x, _to_memory_kind(x.sharding, HOST_MEMORY_KIND), may_alias=False), params)
    raise ConfigError(f"reference.mode = {mode!r} holds no reference params; place_reference takes "
                      f"{' | '.join(MODES_WITH_PARAMS)}")


def reference_layer_hook(mode: str) -> Callable[[dict], dict] | None:
    """The Decoder's `layer_params_hook` for the reference forward: host mode copies one layer's params
    (already this device's shard of them) to device memory inside the scan body."""
    return _to_device if mode == "host" else None


class HostReferenceSteps(StepFunctions):
    """StepFunctions whose reference forward first brings the non-layer reference params to the device.

    The stacked layers stay in host memory and stream through `reference_layer_hook("host")`; the
    embedding / final norm / LM head are used outside the scan, so they are copied once per
    reference forward and are free again once it is done."""

    def __init__(self, **kwargs):
        super().__init__(reference_hook=reference_layer_hook("host"), **kwargs)

    def _reference_logprobs(self, params, frozen, reference, micro):
        non_layer = {k: v for k, v in reference.items() if k != "layers"}
        on_device = type(reference)({**reference, **_to_device(non_layer)}) if non_layer else reference
        return super()._reference_logprobs(params, frozen, on_device, micro)


def make_step_functions(reference_mode: str, **kwargs) -> StepFunctions:
    """The StepFunctions for a reference mode (`kwargs` are StepFunctions' own)."""
    if reference_mode == "host":
        return HostReferenceSteps(reference_mode=reference_mode, **kwargs)
    return StepFunctions(reference_mode=reference_mode, **kwargs)


# ---- memory figures -----------------------------------------------------------------------------

def per_device_bytes(tree, shardings) -> dict[str, int]:
    """{memory kind: bytes one device holds} for arrays (or ShapeDtypeStructs) placed by `shardings`."""
    out: dict[str, int] = {}
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape)
        kind = s.memory_kind or "device"
        out[kind] = out.get(kind, 0) + int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return out


def reference_memory_report(trainer) -> dict:
    """Per-device memory of the compiled train step of a built `Trainer` (build_data/model/reference/steps
    done): XLA's memory analysis plus where the reference's bytes are.

    `reference_device_bytes` is what the reference holds in device memory for the whole step;
    `reference_streamed_bytes` is what host mode copies in during a reference forward and frees again
    (the non-layer params plus one layer): the largest the reference ever gets on the device."""
    batch = trainer.train_batch(0)
    compiled = trainer.train_step.lower(trainer.state, trainer.frozen, trainer.reference, batch).compile()
    stats = compiled.memory_analysis()
    analysis = {name: int(getattr(stats, name)) for name in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
        "host_argument_size_in_bytes", "host_temp_size_in_bytes")} if stats is not None else {}
    ref = trainer.reference
    ref_shardings = jax.tree.map(lambda x: x.sharding, ref)
    by_kind = per_device_bytes(ref, ref_shardings)
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ref["layers"])
    one_layer_shardings = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])),
                                       ref_shardings["layers"])
    non_layer = [k for k in ref.keys() if k != "layers"]
    streamed = sum(per_device_bytes(one_layer, one_layer_shardings).values()) + sum(
        sum(per_device_bytes(ref[k], ref_shardings[k]).values()) for k in non_layer)
    return {
        "mode": trainer.config.reference.mode,
        "memory_analysis": analysis,
        "reference_bytes_by_memory_kind": by_kind,
        "reference_device_bytes": by_kind.get("device", 0),
        "reference_host_bytes": by_kind.get(HOST_MEMORY_KIND, 0),
        "reference_streamed_bytes": streamed if trainer.config.reference.mode == "host" else 0,
        **_host_params_in_hlo(compiled.as_text()),
    }


_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                 "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_HOST_PARAM = re.compile(r"(\w+)\[([\d,]*)\]\{[^{}]*:S\(5\)\}")  # f32[8,64,256]{2,1,0:S(5)}


def _host_params_in_hlo(hlo_text: str) -> dict[str, int]:
    """The entry parameters XLA compiled into host memory (memory space 5) and their per-device bytes.

    XLA:CPU's memory analysis counts them in argument_size_in_bytes (it has one memory), so this is
    the compiled program's own statement of what is not in device memory."""
    layout = next((line for line in hlo_text.splitlines() if "entry_computation_layout=" in line), "")
    params = layout.split("entry_computation_layout={(", 1)[-1].split(")->", 1)[0]
    found = _HOST_PARAM.findall(params)
    size = sum(_HLO_ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])) for dtype, dims in found)
    return {"hlo_host_params": len(found), "hlo_host_param_bytes": size}
