"""The train and eval steps: pure functions of pytrees, jitted with explicit shardings.

A step receives its micro-batches stacked on a leading axis `[A, ...]` (A = gradient-accumulation
count) and scans over them. Each micro-batch contributes `sum of per-pair losses / valid pairs in the
whole step`, so the accumulated gradient is exactly the gradient of the mean over the global batch,
however the batch is split.

State is a dict pytree {"params", "opt_state", "step", "bad_steps"}; `frozen` holds the model's
non-trained variables (all base weights under LoRA, nothing otherwise); `reference_params` is the run's
reference object's `params` (a params pytree for device/host modes, None when logprobs come cached in
the batch, from the LoRA base, or the loss is reference-free). The step functions are made once per run
by `make_train_step` / `make_eval_step`, closing over the graphdef, the loss config and the reference
object (jaxdpo.reference), which says how its logprobs are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdpo import losses
from jaxdpo.ops.logprobs import gather_scored, pair_sums, token_logprobs



def pair_logprobs(graphdef, states, batch, *, num_pairs: int, chunk_size: int,
                  layer_params_hook: Callable | None = None, lora_dropout_key=None) -> dict[str, jax.Array]:
    """Per-pair completion logprob sums and lengths {pc, pr, nc, nr}, each [P] float32. A
    `lora_dropout_key` (the policy's training forward only) turns on LoRA adapter dropout."""
    model = nnx.merge(graphdef, *states)
    kwargs = {} if layer_params_hook is None else {"layer_params_hook": layer_params_hook}
    if lora_dropout_key is not None:
        kwargs["lora_dropout_key"] = lora_dropout_key
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                 batch["branch_ids"], **kwargs)
    targets, pair_index, side = batch["targets"], batch["pair_index"], batch["side"]
    if "scored_index" in batch:  # the LM head only where a logprob counts (the batcher always adds it)
        hidden, targets, pair_index, side = gather_scored(batch["scored_index"], hidden, targets, pair_index, side)
    head = model.lm_head_weight()
    chunk_size = logits_chunk_size(chunk_size, rows=hidden.shape[0], vocab=head.shape[-1])
    token_lp = token_logprobs(hidden, head, targets, chunk_size=chunk_size,
                              logit_softcap=model.config.final_logit_softcap)
    return pair_sums(token_lp, pair_index, side, num_pairs)


# Upper bound on one chunk of fp32 logits [rows, chunk, vocab]. With a 150k vocabulary a chunk of 256
# positions over 16 rows would already be 2.4 GB, so the chunk shrinks until the block fits.
LOGITS_CHUNK_BYTES = 256 * 2**20


def logits_chunk_size(max_chunk: int, *, rows: int, vocab: int) -> int:
    """Positions per logprob chunk: at most `max_chunk` (model.logprob_chunk), and small enough that
    the chunk's fp32 logits stay under LOGITS_CHUNK_BYTES (never below 8 positions)."""
    fits = LOGITS_CHUNK_BYTES // (4 * rows * vocab)
    return int(max(8, min(max_chunk, fits)))


def dropout_key(seed: int, step, micro_index) -> jax.Array:
    """The LoRA dropout key of one micro-batch of one optimizer step: a pure function of the config seed,
    the global step (checkpointed in the state) and the micro-batch's index, so a resumed run draws the
    masks an uninterrupted one would, and each accumulated micro-batch draws its own."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_index)


def make_micro_loss(graphdef, *, reference, loss_cfg, num_pairs: int, chunk_size: int) -> Callable:
    """`micro_loss(params, frozen, reference_params, micro, total_valid, lora_dropout_key=None)` ->
    (loss of the micro-batch's pairs / total_valid, metric sums). `reference` is the run's
    jaxdpo.reference.Reference; `reference_params` is its `params` (the jitted argument)."""

    def micro_loss(params, frozen, reference_params, micro, total_valid, lora_dropout_key=None):
        # Dropout (if the model has any) only here, in the policy's training forward: the reference,
        # eval and cached-reference forwards get no key and are deterministic.
        policy = pair_logprobs(graphdef, (params, frozen), micro, num_pairs=num_pairs, chunk_size=chunk_size,
                               lora_dropout_key=lora_dropout_key)
        rc, rr = reference.logprobs(graphdef, params, frozen, reference_params, micro, num_pairs=num_pairs,
                                    chunk_size=chunk_size)
        loss_sum, metric_sums = losses.preference_loss(loss_cfg, policy["pc"], policy["pr"], rc, rr, policy["nc"],
                                                       policy["nr"], micro["pair_valid"])
        metric_sums = dict(metric_sums)
        metric_sums["tokens"] = jnp.sum((micro["side"] > 0) * 1.0)
        return loss_sum / total_valid, metric_sums

    return micro_loss


def make_train_step(graphdef, *, reference, loss_cfg, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, num_pairs: int, chunk_size: int,
                    dropout_seed: int | None = None) -> Callable:
    """`train_step(state, frozen, reference_params, batches) -> (state, metrics)` over micro-batches stacked
    on a leading axis. `dropout_seed` (the config seed; None = the model has no LoRA dropout) keys micro-batch
    i of step s with dropout_key(seed, s, i)."""
    micro_loss = make_micro_loss(graphdef, reference=reference, loss_cfg=loss_cfg, num_pairs=num_pairs,
                                 chunk_size=chunk_size)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, frozen, reference_params, batches):
        params = state["params"]
        total_valid = jnp.maximum(jnp.sum(batches["pair_valid"]).astype(jnp.float32), 1.0)

        def accumulate(carry, indexed_micro):
            grads_sum, metrics_sum = carry
            micro_index, micro = indexed_micro
            # Without dropout the micro loss is called exactly as before (no key argument at all).
            keys = () if dropout_seed is None else (dropout_key(dropout_seed, state["step"], micro_index),)
            (_, metric_sums), grads = grad_fn(params, frozen, reference_params, micro, total_valid, *keys)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
            return (grads_sum, jax.tree.map(jnp.add, metrics_sum, metric_sums)), None

        first = jax.tree.map(lambda x: x[0], batches)
        metric_shapes = jax.eval_shape(lambda: grad_fn(params, frozen, reference_params, first, total_valid)[0][1])
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        num_micro = batches["pair_valid"].shape[0]
        (grads, metric_sums), _ = jax.lax.scan(accumulate, (zeros_grads, zeros_metrics),
                                               (jnp.arange(num_micro), batches))
        tokens = metric_sums.pop("tokens")
        metrics = {k: v / total_valid for k, v in metric_sums.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new_state = apply_gradients(state, grads, optimizer, finite)
        metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite * 1.0, pairs=total_valid,
                       tokens=tokens)
        return new_state, metrics

    return train_step


def apply_gradients(state, grads, optimizer: optax.GradientTransformation, finite) -> dict[str, Any]:
    """One optimizer update. A non-finite loss or gradient leaves params and optimizer state untouched; the
    data position still advances (the loop counts consecutive bad steps and stops the run)."""
    params = state["params"]
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
    }


def make_eval_step(graphdef, *, reference, loss_cfg, num_pairs: int, chunk_size: int) -> Callable:
    """`eval_step(params, frozen, reference_params, batch)` -> metric sums over the batch's valid pairs and
    their count ("pairs"); the caller divides by the total count."""
    micro_loss = make_micro_loss(graphdef, reference=reference, loss_cfg=loss_cfg, num_pairs=num_pairs,
                                 chunk_size=chunk_size)

    def eval_step(params, frozen, reference_params, batch):
        _, metric_sums = micro_loss(params, frozen, reference_params, batch, 1.0)
        metric_sums = dict(metric_sums)
        metric_sums["pairs"] = jnp.sum(batch["pair_valid"]).astype(jnp.float32)
        return metric_sums

    return eval_step


def jit_train_step(train_step: Callable, *, state_shardings, frozen_shardings, reference_shardings,
                   batch_shardings, replicated) -> Callable:
    """The train step jitted with explicit shardings; the state is donated (updated in place)."""
    return jax.jit(train_step,
                   in_shardings=(state_shardings, frozen_shardings, reference_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_step: Callable, *, params_shardings, frozen_shardings, reference_shardings,
                  batch_shardings, replicated) -> Callable:
    return jax.jit(eval_step, in_shardings=(params_shardings, frozen_shardings, reference_shardings, batch_shardings),
                   out_shardings=replicated)


def init_state(params, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "bad_steps": jnp.zeros((), jnp.int32),
    }
