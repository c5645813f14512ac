"""The reference model behind one interface: one class per reference.mode, and the factory that picks one.

A `Reference` tells the step how to get the reference's per-pair logprob sums (rc, rr) of a micro-batch
(for groups the sums of every completion slot, ref_logps [P, N]);
its `params` (a params pytree, or None) is what the jitted step takes as its `reference_params` argument.

  device     a frozen copy of the initial (or reference.path's) weights, sharded like the policy
  host       the same copy in pinned host memory, streamed to the device one layer at a time
  cached     logprobs computed once per dataset and joined to each batch (jaxdpo/preference/reference_cache.py)
  lora_base  the policy with its adapters zeroed: the base model, with no copy of anything
  none       no reference (reference-free losses; chosen whatever the mode when every loss is one)

`choose_reference` is the only place mode names are compared; everything else asks the class.

`host` keeps the reference params in pinned host memory with the policy's partition specs. The
reference forward brings the non-layer params (embedding, final norm, LM head) to the device when it
starts, and the stacked layer params one layer at a time inside the layer scan (the Decoder's
`layer_params_hook`), so the reference's device footprint is about one layer plus the embeddings
instead of a whole model. On GPU/TPU, `jax.device_put(x, jax.memory.Space.Device)` inside jit lowers to
a host-to-device copy (XLA's `annotate_device_placement`; tests/test_scale.py checks the CUDA lowering
has one per layer param inside the scan). On CPU (jax 0.10) JAX lowers it to nothing: host and device
memory are the same RAM, so the scan reads each layer straight from the `pinned_host` argument. The
numbers are the same; only the copy is elided (tools/memory_report.py reads what XLA placed where).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxdpo.data.formats import ExampleKind
from jaxdpo.errors import ConfigError
from jaxdpo.models.hf_io import check_checkpoint_dir
from jaxdpo.preference import losses
from jaxdpo.training import objectives
from jaxdpo.training.step import pair_logprobs

HOST_MEMORY_KIND = "pinned_host"


class Reference:
    """The interface. Class attributes describe the kind (config checks and the build read them)."""

    mode: ClassVar[str]
    gives_logprobs: ClassVar[bool] = True  # False: only reference-free losses can train
    uses_weights: ClassVar[bool] = False  # built from weights: reference.path's, else the initial policy's
    needs_lora: ClassVar[bool] = False
    runs_forward: ClassVar[bool] = False  # the step runs a reference forward (FLOPs count it)
    streams_layers: ClassVar[bool] = False  # its layers come from host memory inside the scan
    batch_keys: ClassVar[tuple[str, ...]] = ()  # what it reads from each batch
    takes_groups: ClassVar[bool] = True  # gives the sums of every completion of a group

    def __init__(self, params=None):
        self.params = params

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs: int, chunk_size: int,
                 slots: int | None = None) -> dict:
        """{rc, rr} [P] of the micro-batch ({ref_logps} [P, slots] for groups of up to `slots` completions),
        the values None without a reference; `params` is self.params as the jitted step received it."""
        raise NotImplementedError

    def attach(self, split: str, batch: dict) -> dict:
        """The host batch of `split` ("train" / "eval") with whatever this reference reads from batches."""
        return batch

    def without_weights(self) -> "Reference":
        """This reference without its weights, for a jitted step to close over (they reach the step as its
        argument): steps that a later run reuses keep no earlier run's weights alive."""
        shell = copy.copy(self)
        shell.params = None
        return shell

    @classmethod
    def check_mesh(cls, mesh) -> None:
        """ConfigError if this kind cannot run on `mesh`'s devices."""

    @classmethod
    def from_weights(cls, weights, *, is_live_policy: bool, cache: Callable) -> "Reference":
        """The reference made of `weights` (uses_weights kinds). `is_live_policy`: they are the policy's own
        buffers (donated to the step, changed every update), so a kept copy must be a real copy.
        `cache(weights)` computes or loads the cached logprobs (cached mode)."""
        return cls()


def _placed_copy(params, memory_kind: str | None):
    """A real copy of `params` with the same partition specs, in device memory or `memory_kind`."""
    def place(x):
        sharding = x.sharding if memory_kind is None else NamedSharding(x.sharding.mesh, x.sharding.spec,
                                                                          memory_kind=memory_kind)
        return jax.device_put(x, sharding, may_alias=False)
    return jax.tree.map(place, params)


def _to_device(tree):
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


# The reference's name for each policy sum of step.pair_logprobs (its lengths are the policy's).
REFERENCE_NAMES = {"pc": "rc", "pr": "rr", "logps": "ref_logps"}


def _stopped(out: dict) -> dict:
    return {REFERENCE_NAMES[k]: jax.lax.stop_gradient(v) for k, v in out.items() if k in REFERENCE_NAMES}


def _absent(slots: int | None) -> dict:
    return {"ref_logps": None} if slots else {"rc": None, "rr": None}


class DeviceReference(Reference):
    """A frozen copy of the initial weights, sharded like the policy. Under LoRA `frozen` is the shared
    base weights and `params` replaces the trainable part (the adapters, zero-initialized at step 0)."""

    mode = "device"
    uses_weights = runs_forward = True

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs, chunk_size, slots=None):
        return _stopped(pair_logprobs(graphdef, (params, frozen), micro, num_pairs=num_pairs, chunk_size=chunk_size,
                                      slots=slots))

    @classmethod
    def from_weights(cls, weights, *, is_live_policy, cache):
        return cls(_placed_copy(weights, None) if is_live_policy else weights)


class HostReference(Reference):
    """The device reference's shards in pinned host memory; the forward first brings the non-layer params
    to the device (used outside the scan, free again once it is done), the stacked layers stream through
    the Decoder's layer_params_hook one at a time."""

    mode = "host"
    uses_weights = runs_forward = streams_layers = True

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs, chunk_size, slots=None):
        non_layer = {k: v for k, v in params.items() if k != "layers"}
        on_device = type(params)({**params, **_to_device(non_layer)}) if non_layer else params
        return _stopped(pair_logprobs(graphdef, (on_device, frozen), micro, num_pairs=num_pairs,
                                      chunk_size=chunk_size, layer_params_hook=_to_device, slots=slots))

    @classmethod
    def check_mesh(cls, mesh) -> None:
        kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
        if HOST_MEMORY_KIND not in kinds:
            platform = mesh.devices.flat[0].platform
            raise ConfigError(f"reference.mode = host needs '{HOST_MEMORY_KIND}' memory, which {platform} devices "
                              f"do not offer (they have {sorted(kinds)}); use reference.mode = device")

    @classmethod
    def from_weights(cls, weights, *, is_live_policy, cache):
        return cls(_placed_copy(weights, HOST_MEMORY_KIND))


class CachedReference(Reference):
    """Logprobs of every train/eval pair computed once (or loaded) under a fingerprint; batches carry
    ref_chosen / ref_rejected, and training holds no reference weights."""

    mode = "cached"
    uses_weights = True
    takes_groups = False  # the cache holds two sums per example (ref_chosen, ref_rejected)
    batch_keys = ("ref_chosen", "ref_rejected")

    def __init__(self, cache):
        super().__init__(None)
        self.cache = cache  # a jaxdpo.preference.reference_cache.ReferenceCache

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs, chunk_size, slots=None):
        return {"rc": micro["ref_chosen"], "rr": micro["ref_rejected"]}

    def attach(self, split: str, batch: dict) -> dict:
        return self.cache.attach(split, batch)

    @classmethod
    def from_weights(cls, weights, *, is_live_policy, cache):
        return cls(cache(weights))


class LoRABaseReference(Reference):
    """The base model is the policy with its adapters off: zero A and B add exactly 0 to x W, so this is
    the same forward over the shared frozen weights, with no copy of them."""

    mode = "lora_base"
    needs_lora = runs_forward = True

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs, chunk_size, slots=None):
        adapters_off = jax.tree.map(jnp.zeros_like, policy_params)
        return _stopped(pair_logprobs(graphdef, (adapters_off, frozen), micro, num_pairs=num_pairs,
                                      chunk_size=chunk_size, slots=slots))


class NoReference(Reference):
    """Reference-free losses (SimPO, ORPO) need none."""

    mode = "none"
    gives_logprobs = False

    def logprobs(self, graphdef, policy_params, frozen, params, micro, *, num_pairs, chunk_size, slots=None):
        return _absent(slots)


KINDS: dict[str, type[Reference]] = {kind.mode: kind for kind in (
    DeviceReference, HostReference, CachedReference, LoRABaseReference, NoReference)}


def choose_reference(mode: str, *, lora: bool, loss_needs_reference: bool) -> tuple[type[Reference], str | None]:
    """The factory: the kind of reference a run with `reference.mode = mode` builds, and a note to report
    when it is not the one named. Reference-free losses (simpo, orpo) read no reference logprobs, so any
    mode builds `none`: no copy held, no forward run. With LoRA the initial policy is the base model
    (B = 0), so a device copy of it would be the base weights twice: lora_base is the same reference with
    no copy."""
    if not loss_needs_reference and mode != "none":
        return NoReference, (f"none: every loss in loss.types is reference-free, so reference.mode = {mode} "
                             f"builds no reference model and runs no reference forward")
    if lora and mode == "device":
        return LoRABaseReference, ("device with LoRA: the reference is the base model, computed as "
                                   "lora_base (adapters off) instead of a copy")
    return KINDS[mode], None


def reference_kind(config, *, lora_on: bool) -> tuple[type[Reference], str | None]:
    """choose_reference for a run's config: its reference.mode, LoRA and what its objective needs (loss.types;
    a reward model needs no reference)."""
    return choose_reference(config.reference.mode, lora=lora_on,
                            loss_needs_reference=objectives.objective_kind(config).needs_reference(config))


def check_config(config, *, lora_on: bool) -> None:
    """The `reference` section against LoRA and the loss: what each kind loads and needs."""
    mode, path = config.reference.mode, config.reference.path
    named = KINDS[mode]  # what the user named: the checks below are about that setting
    if path:
        if not named.uses_weights:
            raise ConfigError(f"reference.path = {path!r} is set but reference.mode = {mode!r} loads no "
                              f"reference checkpoint; clear one of them")
        check_checkpoint_dir(path, "reference.path")
    if named.needs_lora and not lora_on:
        raise ConfigError("reference.mode = 'lora_base' needs LoRA: set lora.rank > 0 (e.g. 16), "
                          "or choose reference.mode device | host | cached")
    base_dtype = config.lora.get("base_dtype", "none") if lora_on else "none"
    if base_dtype != "none" and named.streams_layers:
        raise ConfigError(f"reference.mode = {mode} with lora.base_dtype = {base_dtype} is not supported: the LoRA "
                          f"reference is the quantized base itself (no copy); use reference.mode device or cached")
    if lora_on and path:
        raise ConfigError(f"reference.path = {path!r} with LoRA is not supported: the LoRA reference is the "
                          f"base model (reference.mode lora_base); clear reference.path")
    grouped = losses.example_kind(config.loss) is ExampleKind.GROUP
    if grouped and not reference_kind(config, lora_on=lora_on)[0].takes_groups:
        raise ConfigError(f"reference.mode = {mode} cannot serve groups (loss.group = {losses.group_rule(config.loss)!r}):"
                          " it caches two logprob sums per example; use reference.mode device, host or lora_base")


def gives_logprobs(config, *, lora_on: bool) -> bool:
    """Whether the run's reference gives logprobs (reference-free losses need none)."""
    return reference_kind(config, lora_on=lora_on)[0].gives_logprobs
