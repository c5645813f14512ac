"""Per-token logprobs of the targets without materializing [batch, time, vocab] logits, and the
segment sums that turn them into per-example completion logprobs (`pair_sums`: slots 1 and 2 of pairs and
unpaired rows; `slot_sums`: the N slots of groups).

The LM head and the fp32 logsumexp run over chunks of the time axis in a `lax.map` (a scan), so only one
chunk of logits is ever alive. Differentiated, the head's weight decides the passes over the vocabulary:
frozen (LoRA), each chunk also forms d logp / d hidden while its logits are live, and the backward only
scales it (two passes); trained, positions that fit one chunk keep that chunk's logit gradients and the
backward forms both gradients from them (three passes), longer rows run each chunk under `jax.checkpoint`
and the backward recomputes it (four).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_logits(hidden_chunk, head_weight, logit_softcap):
    """hidden [B,C,D] @ head [D,V] -> (logits [B,C,V] float32 after the softcap, the softcap's derivative
    d logits / d pre-softcap logits, or None without one)."""
    # The matmul runs in the hidden's dtype (bf16 on accelerators) and accumulates in fp32.
    logits = jnp.einsum("bcd,dv->bcv", hidden_chunk, head_weight.astype(hidden_chunk.dtype),
                        preferred_element_type=jnp.float32)
    if not logit_softcap:
        return logits, None
    capped = jnp.tanh(logits / logit_softcap)
    return logit_softcap * capped, 1.0 - capped * capped


def _is_target(logits, target_chunk):
    """[B,C,V] bool, True at each position's target. A one-hot mask rather than a gather: when V is split
    over the `tensor` axis the pick is a local select plus one all-reduce (no gather of the logits), and
    its backward is a select, not a scatter. A target outside [0, V) (-100 or a pad id on padding)
    matches nothing and gives a finite value that `pair_sums` never counts."""
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    return vocab_ids == target_chunk[..., None]


def _chunk_logprobs(hidden_chunk, head_weight, target_chunk, logit_softcap):
    """log p(target) for one chunk: hidden [B,C,D], head [D,V], targets [B,C] -> [B,C] float32."""
    logits, _ = _chunk_logits(hidden_chunk, head_weight, logit_softcap)
    target_logits = jnp.sum(jnp.where(_is_target(logits, target_chunk), logits, 0.0), axis=-1)
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def _chunk_logprobs_and_logit_grads(hidden_chunk, head_weight, target_chunk, logit_softcap):
    """log p(target) [B,C] and its gradient w.r.t. the chunk's logits before any softcap [B,C,V] (both
    float32): onehot(y) - softmax, times the softcap's derivative per logit."""
    logits, softcap_slope = _chunk_logits(hidden_chunk, head_weight, logit_softcap)
    is_target = _is_target(logits, target_chunk)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    logprobs = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1) - log_normalizer
    logit_grads = is_target.astype(jnp.float32) - jnp.exp(logits - log_normalizer[..., None])
    if softcap_slope is not None:
        logit_grads = logit_grads * softcap_slope
    return logprobs, logit_grads


def _chunk_logprobs_and_hidden_grad(hidden_chunk, head_weight, target_chunk, logit_softcap):
    """log p(target) [B,C] and its gradient w.r.t. the hidden chunk [B,C,D] (both float32), the head held
    fixed: d log p(y) / d h = W (onehot(y) - softmax) (times the softcap's derivative per logit), formed
    while the chunk's logits are live, so no backward pass has to recompute them."""
    logprobs, logit_grads = _chunk_logprobs_and_logit_grads(hidden_chunk, head_weight, target_chunk, logit_softcap)
    head = head_weight.astype(hidden_chunk.dtype)
    hidden_grads = jnp.einsum("bcv,dv->bcd", logit_grads.astype(head.dtype), head,
                              preferred_element_type=jnp.float32)
    return logprobs, hidden_grads


def _over_chunks(chunk_fn, hidden, targets, chunk):
    """`chunk_fn(hidden [B,C,D], targets [B,C])` mapped over time chunks of C positions -> its outputs
    with the chunks joined back into [B,T,...]. T is padded to whole chunks and the padding sliced off."""
    batch, time, _ = hidden.shape
    num_chunks = -(-time // chunk)
    padded_time = num_chunks * chunk
    if padded_time != time:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded_time - time), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded_time - time)))
    # [B, N*C, ...] -> [N, B, C, ...]: the chunk axis leads so lax.map walks over it.
    hidden_chunks = jnp.moveaxis(hidden.reshape(batch, num_chunks, chunk, -1), 1, 0)
    target_chunks = jnp.moveaxis(targets.reshape(batch, num_chunks, chunk), 1, 0)
    outputs = jax.lax.map(lambda hy: chunk_fn(hy[0], hy[1]), (hidden_chunks, target_chunks))

    def joined(chunked):
        return jnp.moveaxis(chunked, 0, 1).reshape(batch, padded_time, *chunked.shape[3:])[:, :time]
    return jax.tree.map(joined, outputs)


def _rematerialized_logprobs(hidden, head_weight, targets, chunk, logit_softcap):
    """The logprobs differentiable in both hidden and head: each chunk under `jax.checkpoint`, so the
    forward keeps one chunk of logits alive and the backward recomputes one chunk at a time (forward,
    recompute, and the two gradient products). The head is an explicit argument of the checkpointed
    function, so its gradient is accumulated chunk by chunk by the scan's transpose."""
    chunk_fn = jax.checkpoint(functools.partial(_chunk_logprobs, logit_softcap=logit_softcap))
    return _over_chunks(lambda h, y: chunk_fn(h, head_weight, y), hidden, targets, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(hidden, head_weight, targets, chunk, logit_softcap):
    """[B,T] float32 logprobs; undifferentiated (reference passes, eval, scoring) the forward alone."""
    chunk_fn = functools.partial(_chunk_logprobs, head_weight=head_weight, logit_softcap=logit_softcap)
    return _over_chunks(lambda h, y: chunk_fn(h, target_chunk=y), hidden, targets, chunk)


def _head_logprobs_fwd(hidden, head_weight, targets, chunk, logit_softcap):
    """Two matmul passes over the vocabulary when only the hidden states are differentiated (a frozen
    head: LoRA), saving d logp / d hidden [B,T,D]. A trained head whose positions fit one chunk keeps that
    chunk's logit gradients [B,T,V] (the memory of the one chunk of logits the forward holds anyway), and
    the backward forms both gradients from them: three passes. Longer rows take the rematerialized path's
    linearization (four)."""
    if not head_weight.perturbed and hidden.perturbed:
        chunk_fn = functools.partial(_chunk_logprobs_and_hidden_grad, head_weight=head_weight.value,
                                     logit_softcap=logit_softcap)
        logprobs, hidden_grads = _over_chunks(lambda h, y: chunk_fn(h, target_chunk=y), hidden.value,
                                              targets.value, chunk)
        return logprobs, (hidden_grads.astype(hidden.value.dtype), None, None)
    if head_weight.perturbed and hidden.value.shape[1] <= chunk:
        logprobs, logit_grads = _chunk_logprobs_and_logit_grads(hidden.value, head_weight.value, targets.value,
                                                                logit_softcap)
        return logprobs, (None, None, (logit_grads.astype(hidden.value.dtype), hidden.value, head_weight.value))
    logprobs, head_vjp = jax.vjp(lambda h, w: _rematerialized_logprobs(h, w, targets.value, chunk, logit_softcap),
                                 hidden.value, head_weight.value)
    return logprobs, (None, head_vjp, None)


def _head_logprobs_bwd(chunk, logit_softcap, residuals, cotangent):
    hidden_grads, head_vjp, kept = residuals
    if head_vjp is not None:
        return (*head_vjp(cotangent), None)
    if hidden_grads is not None:
        return (cotangent[..., None] * hidden_grads).astype(hidden_grads.dtype), None, None
    logit_grads, hidden, head = kept
    scaled = cotangent[..., None].astype(logit_grads.dtype) * logit_grads
    hidden_grads = jnp.einsum("btv,dv->btd", scaled, head.astype(scaled.dtype), preferred_element_type=jnp.float32)
    head_grads = jnp.einsum("btd,btv->dv", hidden, scaled, preferred_element_type=jnp.float32)
    return hidden_grads.astype(hidden.dtype), head_grads.astype(head.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd, symbolic_zeros=True)


def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *,
                   chunk_size: int = 256, logit_softcap: float | None = None) -> jax.Array:
    """log p(targets[b,t] | hidden[b,t]) as [B,T] float32, computed chunk by chunk over T.

    hidden: [B,T,D] final-normed hidden states; head_weight: [D,V]; targets: [B,T] int.
    logit_softcap: if set (not None/0), logits become c*tanh(logits/c) before the softmax (Gemma 2).
    Values at positions whose target is out of [0, V) are meaningless (but finite).
    Differentiated with the head frozen (not perturbed: LoRA, whose base is outside the trained params),
    the gradient w.r.t. the hidden states is formed in the forward pass (two passes over the vocabulary
    instead of three); with the head trained, the chunks are rematerialized in the backward.
    """
    batch, time, _ = hidden.shape
    if targets.shape != (batch, time):
        raise ValueError(f"token_logprobs: targets shape {targets.shape} does not match hidden "
                         f"[B,T]=({batch}, {time})")
    if chunk_size <= 0:
        raise ValueError(f"token_logprobs: chunk_size must be positive, got {chunk_size} "
                         "(config key model.logprob_chunk)")
    return _head_logprobs(hidden, head_weight, targets, min(chunk_size, time), logit_softcap or None)


def gather_scored(scored_index, hidden, targets, pair_index, side):
    """Keep only the scored positions of each row: scored_index [R,S] (positions, -1 = empty slot) ->
    hidden [R,S,D] and targets, pair_index, side [R,S], empty slots counting for no pair. The LM head then
    runs on S positions per row instead of T (in a DPO row most positions are prompt or padding).
    A gather along the row, so rows stay where they are sharded.

    Rows split over the `sequence` mesh axis come with scored_index [R,Q,k]: each of the Q shards' scored
    positions, local to its T/Q tokens (jaxdpo.parallel.sequence_parallel.shard_scored_index). Each row is then
    viewed as Q rows of T/Q tokens, [R*Q, T/Q, ...], split over (batch axes, sequence) exactly as the
    tokens already are, and the gather is local: the result is [R*Q, k, ...], a shard's own positions."""
    if scored_index.ndim == 3:
        rows, shards, _ = scored_index.shape
        as_shard_rows = lambda x: x.reshape(rows * shards, x.shape[1] // shards, *x.shape[2:])  # noqa: E731
        return gather_scored(scored_index.reshape(rows * shards, -1), *map(as_shard_rows, (hidden, targets,
                                                                                             pair_index, side)))
    valid = scored_index >= 0
    index = jnp.maximum(scored_index, 0)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)
    hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return hidden, take(targets), jnp.where(valid, take(pair_index), -1), jnp.where(valid, take(side), 0)


def pair_sums(token_lp: jax.Array, pair_index: jax.Array, side: jax.Array,
              num_pairs: int) -> dict[str, jax.Array]:
    """Per-pair completion logprob sums and lengths from per-token logprobs.

    token_lp, pair_index, side: [R,T]. A token counts for pair `pair_index` (-1 = none) on the chosen
    side (side == 1) or the rejected side (side == 2). Returns {pc, pr, nc, nr}, each [P] float32:
    pc/pr sum the chosen/rejected token logprobs, nc/nr count those tokens.
    """
    in_pair = (pair_index >= 0) & (pair_index < num_pairs)
    # Uncounted tokens go to segment 0 with value 0 (a `where`, not a multiply, so a stray NaN on
    # padding cannot leak into a real pair's sum or gradient).
    segment = jnp.where(in_pair, pair_index, 0).reshape(-1)
    flat_lp = token_lp.astype(jnp.float32).reshape(-1)
    sums = {}
    for side_value, logp_key, count_key in ((1, "pc", "nc"), (2, "pr", "nr")):
        counted = (in_pair & (side == side_value)).reshape(-1)
        sums[logp_key] = jax.ops.segment_sum(jnp.where(counted, flat_lp, 0.0), segment,
                                             num_segments=num_pairs)
        sums[count_key] = jax.ops.segment_sum(counted.astype(jnp.float32), segment,
                                              num_segments=num_pairs)
    return sums


def slot_sums(token_lp: jax.Array, pair_index: jax.Array, side: jax.Array, num_pairs: int,
              slots: int) -> dict[str, jax.Array]:
    """Per-example sums of every completion slot 1..`slots` (groups of N completions, side == k for slot k):
    {"logps", "lengths"}, each [P, slots] float32, summed as `pair_sums` sums slots 1 and 2."""
    in_pair = (pair_index >= 0) & (pair_index < num_pairs)
    segment = jnp.where(in_pair, pair_index, 0).reshape(-1)
    flat_lp = token_lp.astype(jnp.float32).reshape(-1)
    logps, lengths = [], []
    for slot in range(1, slots + 1):
        counted = (in_pair & (side == slot)).reshape(-1)
        logps.append(jax.ops.segment_sum(jnp.where(counted, flat_lp, 0.0), segment, num_segments=num_pairs))
        lengths.append(jax.ops.segment_sum(counted.astype(jnp.float32), segment, num_segments=num_pairs))
    return {"logps": jnp.stack(logps, axis=1), "lengths": jnp.stack(lengths, axis=1)}
