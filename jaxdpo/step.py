"""The train and eval steps: pure functions of pytrees, jitted with explicit shardings.

A step receives its micro-batches stacked on a leading axis `[A, ...]` (A = gradient-accumulation
count) and scans over them. Each micro-batch contributes `sum of per-pair losses / valid pairs in the
whole step`, so the accumulated gradient is exactly the gradient of the mean over the global batch,
however the batch is split.

State is a dict pytree {"params", "opt_state", "step", "bad_steps"}; `frozen` holds the model's
non-trained variables (all base weights under LoRA, nothing otherwise); `reference` is what the
reference mode needs (a params pytree for device/host modes, None when logprobs come cached in the
batch or the loss is reference-free).
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


class StepFunctions:
    """Builds the jitted train/eval steps once for a run; holds no arrays."""

    def __init__(self, *, graphdef, loss_cfg, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, reference_mode: str, num_pairs: int, chunk_size: int,
                 reference_hook: Callable | None = None, dropout_seed: int = 0):
        self.graphdef = graphdef
        self.loss_cfg = loss_cfg
        self.optimizer = optimizer
        self.schedule = schedule
        self.reference_mode = reference_mode
        self.num_pairs = num_pairs
        self.chunk_size = chunk_size
        self.reference_hook = reference_hook
        self.dropout_seed = dropout_seed  # config seed: LoRA dropout masks come from dropout_key(seed, ...)

    # -- the math ---------------------------------------------------------------------------------
    def _reference_logprobs(self, params, frozen, reference, micro):
        mode = self.reference_mode
        if mode in ("device", "host"):
            # A full copy of the initial weights; under LoRA `frozen` is shared base weights and
            # `reference` replaces the trainable part (the adapters, zero-initialized at step 0).
            ref = pair_logprobs(self.graphdef, (reference, frozen), micro, num_pairs=self.num_pairs,
                                chunk_size=self.chunk_size, layer_params_hook=self.reference_hook)
            return jax.lax.stop_gradient(ref["pc"]), jax.lax.stop_gradient(ref["pr"])
        if mode == "lora_base":
            # The base model is the policy with its adapters off: zero A and B add exactly 0 to x W,
            # so this is the same forward over the shared frozen weights, with no copy of them.
            adapters_off = jax.tree.map(jnp.zeros_like, params)
            ref = pair_logprobs(self.graphdef, (adapters_off, frozen), micro, num_pairs=self.num_pairs,
                                chunk_size=self.chunk_size)
            return jax.lax.stop_gradient(ref["pc"]), jax.lax.stop_gradient(ref["pr"])
        if mode == "cached":
            return micro["ref_chosen"], micro["ref_rejected"]
        if mode == "none":
            return None, None
        raise ValueError(f"unknown reference mode {mode!r}")

    def _micro_loss(self, params, frozen, reference, micro, total_valid, lora_dropout_key=None):
        # Dropout (if the model has any) only here, in the policy's training forward: the reference,
        # eval and cached-reference forwards get no key and are deterministic.
        policy = pair_logprobs(self.graphdef, (params, frozen), micro, num_pairs=self.num_pairs,
                               chunk_size=self.chunk_size, lora_dropout_key=lora_dropout_key)
        rc, rr = self._reference_logprobs(params, frozen, reference, micro)
        loss_sum, metric_sums = losses.preference_loss(
            self.loss_cfg, policy["pc"], policy["pr"], rc, rr, policy["nc"], policy["nr"],
            micro["pair_valid"])
        metric_sums = dict(metric_sums)
        metric_sums["tokens"] = jnp.sum((micro["side"] > 0) * 1.0)
        return loss_sum / total_valid, metric_sums

    def _has_lora_dropout(self, params, frozen) -> bool:
        """Whether the policy drops adapter inputs (a static attribute of the graph, read while tracing)."""
        layers = getattr(nnx.merge(self.graphdef, params, frozen), "layers", None)
        return getattr(layers, "lora_dropout", 0.0) > 0

    def train_step(self, state, frozen, reference, batches):
        params = state["params"]
        total_valid = jnp.maximum(jnp.sum(batches["pair_valid"]).astype(jnp.float32), 1.0)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
        with_dropout = self._has_lora_dropout(params, frozen)

        def accumulate(carry, indexed_micro):
            grads_sum, metrics_sum = carry
            micro_index, micro = indexed_micro
            # Without dropout the micro loss is called exactly as before (no key argument at all).
            keys = (dropout_key(self.dropout_seed, state["step"], micro_index),) if with_dropout else ()
            (_, metric_sums), grads = grad_fn(params, frozen, reference, micro, total_valid, *keys)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
            metrics_sum = jax.tree.map(jnp.add, metrics_sum, metric_sums)
            return (grads_sum, metrics_sum), None

        first = jax.tree.map(lambda x: x[0], batches)
        metric_shapes = jax.eval_shape(lambda: grad_fn(params, frozen, reference, first, total_valid)[0][1])
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        num_micro = batches["pair_valid"].shape[0]
        (grads, metric_sums), _ = jax.lax.scan(accumulate, (zeros_grads, zeros_metrics),
                                               (jnp.arange(num_micro), batches))

        tokens = metric_sums.pop("tokens")
        metrics = {k: v / total_valid for k, v in metric_sums.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, new_opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves params and optimizer state untouched; the data
        # position still advances (the loop counts consecutive bad steps and stops the run).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
        }
        metrics.update(grad_norm=grad_norm, lr=self.schedule(state["step"]), finite=finite * 1.0,
                       pairs=total_valid, tokens=tokens)
        return new_state, metrics

    def eval_step(self, params, frozen, reference, batch):
        """Sums over the valid pairs of one batch; the caller divides by the total count."""
        _, metric_sums = self._micro_loss(params, frozen, reference, batch, 1.0)
        metric_sums = dict(metric_sums)
        metric_sums["pairs"] = jnp.sum(batch["pair_valid"]).astype(jnp.float32)
        return metric_sums

    # -- jitting ----------------------------------------------------------------------------------
    def jit_train_step(self, *, state_shardings, frozen_shardings, reference_shardings,
                       batch_shardings, replicated) -> Callable:
        return jax.jit(
            self.train_step,
            in_shardings=(state_shardings, frozen_shardings, reference_shardings, batch_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnames="state",
        )

    def jit_eval_step(self, *, params_shardings, frozen_shardings, reference_shardings,
                      batch_shardings, replicated) -> Callable:
        return jax.jit(
            self.eval_step,
            in_shardings=(params_shardings, frozen_shardings, reference_shardings, batch_shardings),
            out_shardings=replicated,
        )


def init_state(params, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "bad_steps": jnp.zeros((), jnp.int32),
    }
