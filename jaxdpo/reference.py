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

from collections.abc import Callable

import jax
from jax.sharding import NamedSharding

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
