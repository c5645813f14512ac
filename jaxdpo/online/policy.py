"""The on-policy rounds' policy, held on the mesh from one round to the next (jaxdpo/online/rounds.py).

A round samples with the held policy's params in place, trains from them (`HeldPolicy.start`: the training
run takes them from memory and reuses the previous round's jitted steps), and the params it ends with make
the next held policy (`after_round`):
- LoRA: the round trains fresh adapters on a base. After the round they are folded into that base in
  memory (`lora.fold_adapters`, one jitted function: W + scale A B), and the adapters start fresh again, so
  the folded base is the next round's base and, with reference.mode = device, its reference (the base with
  the adapters off). A quantized base (lora.base_dtype int8 / nf4) is dequantized, added to and quantized
  again: each round's base is stored as the first one was, at one more rounding of its format per round.
- Without LoRA the trained params are the next round's; its reference (online.reference = previous) is the
  copy the training run makes of them before its first update.

A rerun rebuilds the held policy from what the finished rounds saved (`rebuild`): model.path's weights,
then, for each trained round in order, the trainable params of its final checkpoint, put through the same
`after_round` on the same shardings as the uninterrupted run, so the bits match.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxdpo.checkpoint import saved_policy
from jaxdpo.models import lora as lora_lib
from jaxdpo.models import save_pretrained
from jaxdpo.training import build


def _copy(tree):
    """A real copy of `tree` (same shardings): what a training run may donate while the original is kept."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


@dataclasses.dataclass(frozen=True)
class HeldPolicy:
    """The policy between rounds: `policy.params` (LoRA: fresh adapters) on `policy.frozen` (LoRA: the base,
    else empty); `fresh_adapters`, under LoRA, the adapters every round starts from."""
    policy: build.Policy
    fresh_adapters: Any = None

    def states(self) -> tuple:
        """The states a Sampler over policy.graphdef takes."""
        return self.policy.params, self.policy.frozen

    def start(self, steps: build.Steps | None) -> build.Start:
        """A round's training start: params it may donate (the held ones are not needed after it, except the
        LoRA template), and the previous round's steps to reuse."""
        params = _copy(self.fresh_adapters) if self.fresh_adapters is not None else self.policy.params
        return build.Start(policy=dataclasses.replace(self.policy, params=params), steps=steps)


def initial(config, mesh) -> HeldPolicy:
    """model.path's policy, as a training run builds it (LoRA: with fresh adapters, a quantized base)."""
    policy = build.build_policy(config, mesh, resuming=False)
    return HeldPolicy(policy, _copy(policy.params) if policy.lora is not None else None)


def after_round(held: HeldPolicy, trained_params) -> HeldPolicy:
    """The held policy after a round that trained `held` into `trained_params`."""
    if held.policy.lora is None:
        return HeldPolicy(dataclasses.replace(held.policy, params=trained_params))
    return HeldPolicy(dataclasses.replace(held.policy, params=held.fresh_adapters,
                                          frozen=folded_base(held.policy.frozen, trained_params, held.policy.lora),
                                          rounds_in_base=held.policy.rounds_in_base + 1),
                      held.fresh_adapters)


def folded_base(frozen, adapters, settings: lora_lib.LoRASettings):
    """`frozen` (a LoRA policy's base state) with `adapters` folded in, on the shardings it had."""
    base = nnx.to_pure_dict(frozen)
    layers = lora_lib.fold_adapters(nnx.to_pure_dict(adapters)["layers"], base["layers"], settings)
    layers = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), layers, base["layers"])
    folded = jax.tree.map(lambda x: x, frozen)  # a new state of the same variables, then filled
    nnx.replace_by_pure_dict(folded, {**base, "layers": layers})
    return folded


def rebuild(config, mesh, rounds: str, done: list[dict]) -> HeldPolicy:
    """The held policy after the finished rounds `done` (their markers) under `rounds`."""
    held = initial(config, mesh)
    for index, marker in enumerate(done):
        if marker["trained"]:
            like = held.fresh_adapters if held.fresh_adapters is not None else held.policy.params
            held = after_round(held, final_params(os.path.join(rounds, str(index)), like))
    return held


def final_params(round_workdir: str, like):
    """The trainable params of a round's last checkpoint, placed as `like` (a state of the same structure) is,
    on every process."""
    checkpoints, step, _ = saved_policy.locate(round_workdir)
    saved, _ = saved_policy.read_params(checkpoints, step)
    target = nnx.to_pure_dict(like)

    def place(value, template):
        host = np.asarray(value)
        return jax.make_array_from_callback(template.shape, template.sharding, lambda index: host[index])

    params = jax.tree.map(lambda x: x, like)
    nnx.replace_by_pure_dict(params, jax.tree.map(place, saved, target))
    return params


def export(held: HeldPolicy, out_dir: str, tokenizer) -> None:
    """The held policy as a HF directory (LoRA: its base, the adapters being fresh; a quantized base
    dequantized), written by process 0."""
    model = nnx.merge(held.policy.graphdef, *held.states())
    if held.policy.lora is not None:
        model = lora_lib.merge_adapters(model, held.policy.lora)
    save_pretrained(model, out_dir, tokenizer=tokenizer)
