"""The train and eval steps: pure functions of pytrees, jitted with explicit shardings.

A step receives its micro-batches stacked on a leading axis `[A, ...]` (A = gradient-accumulation
count) and scans over them. Each micro-batch contributes `sum of per-pair losses / valid pairs in the
whole step`, so the accumulated gradient is exactly the gradient of the mean over the global batch,
however the batch is split. A batch-level loss (aot sorts over the global batch) is not a sum of
micro-batch terms: `make_batch_level_gradients` first computes every pair's logprobs, then the loss of
the whole batch and its per-pair coefficients, then each micro-batch's backward with those coefficients.
Eval steps return per-pair values; `make_eval_metrics` computes the metrics over all eval pairs.

State is a dict pytree {"params", "opt_state", "step", "bad_steps"}; `frozen` holds the model's
non-trained variables (all base weights under LoRA, nothing otherwise); `reference_params` is the run's
reference object's `params` (a params pytree for device/host modes, None when logprobs come cached in
the batch, from the LoRA base, or the loss is reference-free). The step functions are made once per run
by `make_train_step` / `make_eval_step`, closing over the graphdef and the objective
(jaxdpo/training/objectives.py): the per-example values of a micro-batch (`objective.make_values`; the
preference objective's are `make_pair_values` below, with the reference object of
jaxdpo.preference.reference saying how its logprobs are computed), their loss and metric sums
(`objective.loss`), what the loss is a mean over (`objective.example_count`) and the logged means
(`objective.metric_means`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdpo.data.formats import ExampleKind
from jaxdpo.data.layouts import EXAMPLE_KEYS
from jaxdpo.ops.logprobs import gather_scored, pair_sums, slot_sums, token_logprobs
from jaxdpo.training.optim import applied_updates


def pair_logprobs(graphdef, states, batch, *, num_pairs: int, chunk_size: int,
                  layer_params_hook: Callable | None = None, lora_dropout_key=None,
                  slots: int | None = None) -> dict[str, jax.Array]:
    """Per-pair completion logprob sums and lengths {pc, pr, nc, nr}, each [P] float32; with `slots` (groups
    of up to N completions) every slot's: {logps, lengths}, each [P, slots]. A `lora_dropout_key` (the
    policy's training forward only) turns on LoRA adapter dropout."""
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
    if slots is not None:
        return slot_sums(token_lp, pair_index, side, num_pairs, slots)
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


def make_pair_values(graphdef, *, reference, num_pairs: int, chunk_size: int,
                     kind: ExampleKind = ExampleKind.PAIR) -> Callable:
    """`pair_values(params, frozen, reference_params, micro, lora_dropout_key=None)` -> per-example slot sums
    {pc, pr, nc, nr} of the policy and {rc, rr} of the reference (None without one), each [P], plus the
    batch's per-example arrays (`label` of unpaired rows; jaxdpo/data/examples.py says what the slots hold).
    For groups (`kind` GROUP) the sums of every slot: {logps, lengths} and {ref_logps}, each [P, N]."""

    def pair_values(params, frozen, reference_params, micro, lora_dropout_key=None):
        slots = micro["group_mask"].shape[-1] if kind is ExampleKind.GROUP else None
        # Dropout (if the model has any) only in the policy's training forward: the reference, eval and
        # cached-reference forwards get no key and are deterministic.
        policy = pair_logprobs(graphdef, (params, frozen), micro, num_pairs=num_pairs, chunk_size=chunk_size,
                               lora_dropout_key=lora_dropout_key, slots=slots)
        ref = reference.logprobs(graphdef, params, frozen, reference_params, micro, num_pairs=num_pairs,
                                 chunk_size=chunk_size, slots=slots)
        return dict(policy, **ref, **{k: micro[k] for k in EXAMPLE_KEYS if k in micro})

    return pair_values


def scored_tokens(micro) -> jax.Array:
    return jnp.sum((micro["side"] > 0) * 1.0)


def make_micro_loss(graphdef, *, objective, num_pairs: int) -> Callable:
    """`micro_loss(params, frozen, reference_params, micro, total_valid, lora_dropout_key=None)` ->
    (loss of the micro-batch's examples / total_valid, metric sums). `reference_params` is the run's
    reference's `params` (the jitted argument; jaxdpo.preference.reference)."""
    pair_values = objective.make_values(graphdef, num_pairs=num_pairs)

    def micro_loss(params, frozen, reference_params, micro, total_valid, lora_dropout_key=None):
        values = pair_values(params, frozen, reference_params, micro, lora_dropout_key)
        loss_sum, metric_sums = objective.loss(values, micro["pair_valid"])
        metric_sums = dict(metric_sums, tokens=scored_tokens(micro))
        return loss_sum / total_valid, metric_sums

    return micro_loss


def _policy_dropout_key(dropout_seed, step, micro_index):
    """The LoRA dropout key of the policy's training forward, or None when the model has no dropout."""
    return None if dropout_seed is None else dropout_key(dropout_seed, step, micro_index)


def _zeros_like_params(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _add(total, tree):
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), total, tree)


def make_accumulated_gradients(graphdef, *, objective, num_pairs: int, dropout_seed: int | None) -> Callable:
    """`gradients(params, frozen, reference_params, batches, total_valid, step)` -> (grads, metric sums) for
    per-pair losses: one forward and backward per micro-batch, summed (each already / total_valid)."""
    micro_loss = make_micro_loss(graphdef, objective=objective, num_pairs=num_pairs)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def gradients(params, frozen, reference_params, batches, total_valid, step):
        def accumulate(carry, indexed_micro):
            grads_sum, metrics_sum = carry
            micro_index, micro = indexed_micro
            key = _policy_dropout_key(dropout_seed, step, micro_index)
            (_, metric_sums), grads = grad_fn(params, frozen, reference_params, micro, total_valid, key)
            return (_add(grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metric_sums)), None

        first = jax.tree.map(lambda x: x[0], batches)
        metric_shapes = jax.eval_shape(lambda: grad_fn(params, frozen, reference_params, first, total_valid)[0][1])
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        num_micro = batches["pair_valid"].shape[0]
        (grads, metric_sums), _ = jax.lax.scan(accumulate, (_zeros_like_params(params), zeros_metrics),
                                               (jnp.arange(num_micro), batches))
        return grads, metric_sums

    return gradients


def make_batch_level_gradients(graphdef, *, objective, num_pairs: int, dropout_seed: int | None) -> Callable:
    """The same `gradients` for a loss over the whole global batch (aot sorts over it), exact under any
    micro-batch split, in two passes:
      1. a forward-only scan: per-pair values [A, P] of every micro-batch (policy and reference);
      2. the loss of the [A*P] vectors and its gradient w.r.t. pc and pr (coef_c, coef_r);
      3. a backward scan: grad of sum_i coef_c_i * pc_i + coef_r_i * pr_i per micro-batch, which by the
         chain rule sums to the gradient of the global-batch loss.
    Costs one more policy forward per micro-batch (the reference forward runs once, in pass 1). Only
    preference objectives are batch-level (their values are the policy's slot logprob sums pc, pr)."""
    pair_values = objective.make_values(graphdef, num_pairs=num_pairs)
    chunk_size = objective.chunk_size

    def gradients(params, frozen, reference_params, batches, total_valid, step):
        indices = jnp.arange(batches["pair_valid"].shape[0])

        def forward(_, indexed_micro):
            micro_index, micro = indexed_micro
            key = _policy_dropout_key(dropout_seed, step, micro_index)
            values = pair_values(params, frozen, reference_params, micro, key)
            return None, dict(values, tokens=scored_tokens(micro))

        _, values = jax.lax.scan(forward, None, (indices, batches))
        tokens = jnp.sum(values.pop("tokens"))
        flat = {k: None if v is None else jax.lax.stop_gradient(v).reshape(-1) for k, v in values.items()}

        def global_loss(pc, pr):
            loss_sum, metric_sums = objective.loss(dict(flat, pc=pc, pr=pr), batches["pair_valid"].reshape(-1))
            return loss_sum / total_valid, metric_sums

        (_, metric_sums), coefs = jax.value_and_grad(global_loss, argnums=(0, 1), has_aux=True)(flat["pc"], flat["pr"])
        coef_c, coef_r = (c.reshape(values["pc"].shape) for c in coefs)

        def backward(grads_sum, indexed_micro):
            micro_index, micro, micro_coef_c, micro_coef_r = indexed_micro
            key = _policy_dropout_key(dropout_seed, step, micro_index)  # pass 1's masks again

            def surrogate(p):  # its gradient is the global loss's gradient through this micro-batch
                policy = pair_logprobs(graphdef, (p, frozen), micro, num_pairs=num_pairs, chunk_size=chunk_size,
                                       lora_dropout_key=key)
                return jnp.sum(micro_coef_c * policy["pc"] + micro_coef_r * policy["pr"])

            return _add(grads_sum, jax.grad(surrogate)(params)), None

        grads, _ = jax.lax.scan(backward, _zeros_like_params(params), (indices, batches, coef_c, coef_r))
        return grads, dict(metric_sums, tokens=tokens)

    return gradients


def make_gradients(graphdef, *, objective, **kwargs) -> Callable:
    """The two-pass batch-level gradients when the objective couples a batch (a batch-level loss: aot,
    aot_unpaired), else the single-pass accumulation."""
    make = make_batch_level_gradients if objective.batch_level else make_accumulated_gradients
    return make(graphdef, objective=objective, **kwargs)


def make_train_step(graphdef, *, objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    num_pairs: int, dropout_seed: int | None = None) -> Callable:
    """`train_step(state, frozen, reference_params, batches) -> (state, metrics)` over micro-batches stacked
    on a leading axis. `dropout_seed` (the config seed; None = the model has no LoRA dropout) keys micro-batch
    i of step s with dropout_key(seed, s, i)."""
    gradients = make_gradients(graphdef, objective=objective, num_pairs=num_pairs, dropout_seed=dropout_seed)

    def train_step(state, frozen, reference_params, batches):
        total_valid = jnp.maximum(objective.example_count(batches), 1.0)
        grads, metric_sums = gradients(state["params"], frozen, reference_params, batches, total_valid,
                                       state["step"])
        tokens = metric_sums.pop("tokens")
        metrics = objective.metric_means(metric_sums, total_valid)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new_state, finite = apply_gradients(state, grads, optimizer, finite)
        # The rate this step applies: the schedule counts applied updates, not batches (optim.py).
        position = applied_updates(state["opt_state"], default=state["step"])  # bad steps take no place
        metrics.update(grad_norm=grad_norm, lr=schedule(position), finite=finite * 1.0,
                       pairs=total_valid, tokens=tokens, bad_steps=new_state["bad_steps"])
        return new_state, metrics

    return train_step


def apply_gradients(state, grads, optimizer: optax.GradientTransformation, finite) -> tuple[dict[str, Any], Any]:
    """One optimizer update -> (state, whether it was committed). The update commits only if the loss and
    gradient (`finite`) and the updated params and optimizer state are all finite: a bad step leaves both
    untouched, so the optimizer's count (the schedule's position) does not advance either. `step`, the
    data position, always advances (the batch is skipped, not retried); the loop counts consecutive bad
    steps (`bad_steps`) and stops the run at train.max_bad_steps."""
    params = state["params"]
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = finite & all_finite(new_params) & all_finite(new_opt_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
    }, finite


def all_finite(tree) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite everywhere."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_eval_step(graphdef, *, objective, num_pairs: int) -> Callable:
    """`eval_step(params, frozen, reference_params, batch)` -> the batch's per-example values (the objective's;
    preference pairs: {pc, pr, nc, nr, rc, rr}, groups: {logps, lengths, ref_logps, group_scores, group_mask}),
    pair_valid and its scored-token count; `make_eval_metrics` turns those of every eval batch into the eval
    metrics."""
    pair_values = objective.make_values(graphdef, num_pairs=num_pairs)

    def eval_step(params, frozen, reference_params, batch):
        values = pair_values(params, frozen, reference_params, batch)  # with the batch's `label`, if any
        return dict({k: v for k, v in values.items() if v is not None}, pair_valid=batch["pair_valid"],
                    tokens=scored_tokens(batch))

    return eval_step


def pair_accuracy(outputs: list[dict], valid, origin_pairs: np.ndarray) -> float:
    """Unpaired eval rows that came from pairs (origin_pairs: [K, 2] (desirable, undesirable) row indices in
    eval order): the fraction of those pairs whose desirable row has the higher implicit reward, strictly."""
    logratio = np.concatenate([np.asarray(o["pc"], np.float64) - np.asarray(o["rc"], np.float64)
                               for o in outputs])[valid]
    return float(np.mean(logratio[origin_pairs[:, 0]] > logratio[origin_pairs[:, 1]]))


def make_eval_metrics(objective, *, group_size: int, origin_pairs: np.ndarray | None = None) -> Callable:
    """`eval_metrics(outputs)`: the eval_step outputs of every eval batch, in eval order -> the mean of every
    metric over the valid eval examples. The valid examples are taken in eval (dataset) order and cut into
    groups of `group_size` (train.batch_size; the last group may be smaller), and the loss is evaluated per
    group: a batch-level loss (aot, KTO's KL estimate) sees the groups a training step would, and no metric
    depends on train.eval_batch_size. Per-example losses do not depend on the grouping at all. Unpaired rows
    that came from pairs (`origin_pairs`, examples.pairs_of_origin) add those pairs' `rewards/accuracies`."""

    @jax.jit
    def group_sums(grouped: dict, valid):
        sums = jax.vmap(lambda values, group_valid: objective.loss(values, group_valid)[1])(grouped, valid)
        return jax.tree.map(jnp.sum, sums)

    def eval_metrics(outputs: list[dict]) -> dict[str, float]:
        valid = np.concatenate([np.asarray(o["pair_valid"]) for o in outputs]) > 0
        count = int(valid.sum())
        groups = max(1, -(-count // group_size))
        keys = objective.value_keys

        def grouped(key):  # the valid examples in order, padded to whole groups: [groups, group_size, ...]
            if key not in outputs[0]:
                return None
            values = np.concatenate([np.asarray(o[key], np.float32) for o in outputs])[valid]
            padding = [(0, groups * group_size - count)] + [(0, 0)] * (values.ndim - 1)
            return np.pad(values, padding).reshape(groups, group_size, *values.shape[1:])

        group_valid = (np.arange(groups * group_size) < count).reshape(groups, group_size)
        sums = jax.device_get(group_sums({k: grouped(k) for k in keys}, group_valid))
        kind_arrays = {k: grouped(k) for k in objective.count_keys}
        counted = objective.example_count(dict(kind_arrays, pair_valid=group_valid))
        means = objective.metric_means(sums, max(float(counted), 1.0))
        metrics = {k: float(v) for k, v in means.items()}
        if origin_pairs is not None and len(origin_pairs):
            metrics["rewards/accuracies"] = pair_accuracy(outputs, valid, origin_pairs)
        return metrics

    return eval_metrics


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
