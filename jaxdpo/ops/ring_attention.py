"""Exact attention over rows split along their tokens (the `sequence` mesh axis): zigzag ring attention.

Layout (jaxdpo/parallel/sequence_parallel.py): with S shards a row is cut into 2S chunks of C tokens and shard i
holds chunks i and 2S-1-i, in increasing original order. Shard i keeps its queries and passes its keys
and values round the ring with `ppermute`, together with their segment ids, branch ids and positions; at
ring step j it holds the block of shard (i - j) mod S. Causality needs no index array because the layout
fixes it per block:
  own block (j = 0)   causal in local order (local order is original order within a shard);
  block of shard s<i  its chunk s precedes both of our chunks and its chunk 2S-1-s follows both: all our
                      queries against its first chunk, no causal mask;
  block of shard s>i  both its chunks precede our chunk 2S-1-i and follow our chunk i: our second chunk
                      against its whole block, no causal mask.
So every shard computes one T/S x T/S block and S-1 half blocks: the same work on each shard (load
balanced), and no fully masked block is ever computed. Segment ids, branch ids and the sliding window
(positions) are then applied exactly as DEVELOPING.md's rule says, so padded, prefix_shared and packed
rows all work; logit softcap and GQA (query heads grouped onto their K/V head) as ops.attention.

Why a ring rather than all-gathered K/V: an all-gather makes every shard hold the whole row's K and V
(and, in the backward pass, a whole-row dK/dV reduced back with a reduce-scatter) for each layer, so the
per-device memory of attention stays linear in T whatever S is. The ring holds one peer block at a time
(T/S tokens), the `ppermute` of the next block can overlap the current block's math, and the bytes moved
are the same as the all-gather's ((S-1)/S of the row's K/V, and dK/dV on the way back).

Memory: a custom VJP (flash-attention style) keeps only q, k, v, the output and its logsumexp for the
backward pass; the backward ring recomputes each block's probabilities and sends dK/dV round with their
block, home after S hops. Plain autodiff through the scan would keep every step's accumulators: O(T) per
device instead of O(T/S).

Kernels: each block goes through a `BlockKernel` (forward -> (out, lse); backward -> dq, dk, dv), the
flash-attention contract, passed as `ring_attention(..., kernel=)`. `xla_blocks` is the einsum version
used on CPU (and the default everywhere today); it materializes one block's scores, so per-device memory
is quadratic in T/S. A fused kernel (cuDNN, splash) plugged in there makes it linear: the blocks it gets are exactly "causal + ids" (own block)
or "ids only" (peer blocks) in local order, which splash expresses with segment ids (+ the two-call
branch merge of ops/splash.py) and cuDNN with its padding/causal flags on the padded layout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdpo.parallel.sharding import shard_axes

AXIS = "sequence"
# A finite "minus infinity": a masked score contributes exp(NEG_INF - m) = 0 exactly, and a row masked
# in every block so far still merges without inf - inf.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
NO_WINDOW = jnp.iinfo(jnp.int32).max


class BlockKernel(NamedTuple):
    """Attention of a query block against one key block.
    forward(q, k, v, q_ids, k_ids, window, causal) -> out [b,t,k,g,h] f32 (normalized), lse [b,t,k,g];
    backward(q, k, v, q_ids, k_ids, window, causal, out, lse, dout) -> dq, dk, dv (f32)."""
    forward: Callable
    backward: Callable


def block_mask(q_ids, k_ids, window, causal: bool):
    """ids = (segment_ids, branch_ids, positions), each [b,t] -> [b,tq,1,1,tk] float32, 1 where query q
    may see key k (DEVELOPING.md's rule; `causal` compares local order, which is original order within a
    block pair that needs it), else 0. Built only from the ids, never from shape-only constants: see
    `_varying_with` for why nothing in a ring step may be a constant of a block's size."""
    (seg_q, br_q, pos_q), (seg_k, br_k, pos_k) = q_ids, k_ids
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
    mask &= (br_k[:, None, :] == 0) | (br_k[:, None, :] == br_q[:, :, None])
    mask &= pos_q[:, :, None] - pos_k[:, None, :] < window
    if causal:
        zero = jnp.minimum(seg_q[:1, :1], 0)  # ids are >= 0: a zero that varies with the ids
        order_q = jnp.arange(seg_q.shape[1])[None, :] + zero
        order_k = jnp.arange(seg_k.shape[1])[None, :] + zero
        mask &= order_q[:, :, None] >= order_k[:, None, :]
    return mask[:, :, None, None, :].astype(jnp.float32)


def _masked(scores, mask):
    """Scores where mask is 1, NEG_INF where it is 0 (arithmetic: no block-sized constant)."""
    return scores * mask + NEG_INF * (1.0 - mask)


def _scores(q, k, *, scale, softcap):
    """q [b,t,k,g,h], k [b,s,k,h] -> (capped scores [b,t,k,g,s] f32, tanh term for the backward or None)."""
    raw = jnp.einsum("btkgh,bskh->btkgs", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return raw, None
    capped = jnp.tanh(raw / softcap)
    return capped * softcap, capped


def xla_blocks(scale: float, softcap: float | None) -> BlockKernel:
    def forward(q, k, v, q_ids, k_ids, window, causal):
        scores, _ = _scores(q, k, scale=scale, softcap=softcap)
        scores = _masked(scores, block_mask(q_ids, k_ids, window, causal))
        m = jnp.max(scores, axis=-1)
        p = jnp.exp(scores - m[..., None])
        total = jnp.sum(p, axis=-1)
        out = jnp.einsum("btkgs,bskh->btkgh", p, v.astype(jnp.float32)) / total[..., None]
        return out, m + jnp.log(total)

    def backward(q, k, v, q_ids, k_ids, window, causal, out, lse, dout):
        scores, capped = _scores(q, k, scale=scale, softcap=softcap)
        mask = block_mask(q_ids, k_ids, window, causal)
        # Times the mask, not only exp of a masked score: a fully masked (padding) row has lse ~ NEG_INF,
        # and must still send no gradient to the keys.
        p = jnp.exp(_masked(scores, mask) - lse[..., None]) * mask
        dv = jnp.einsum("btkgs,btkgh->bskh", p, dout)
        dp = jnp.einsum("btkgh,bskh->btkgs", dout, v.astype(jnp.float32))
        ds = p * (dp - jnp.sum(dout * out, axis=-1)[..., None])
        if capped is not None:
            ds = ds * (1.0 - capped * capped)
        ds = ds * scale
        dq = jnp.einsum("btkgs,bskh->btkgh", ds, k.astype(jnp.float32))
        dk = jnp.einsum("btkgs,btkgh->bskh", ds, q.astype(jnp.float32))
        return dq, dk, dv

    return BlockKernel(forward, backward)


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial softmax results over disjoint key sets -> the result over their union."""
    lse = jnp.logaddexp(lse_a, lse_b)
    return out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None], lse


def _halves(x):
    c = x.shape[1] // 2
    return x[:, :c], x[:, c:]


def _take(ids, part):
    return tuple(_halves(x)[part] for x in ids)


def _concat(first, second):
    return jnp.concatenate([first, second], axis=1)


def _step_forward(kernel, case, q, q_ids, kv, window, out, lse):
    """Merge one ring step's block into the accumulators (out, lse) of all local queries: case 0 own
    block, 1 an earlier shard's, 2 a later shard's. Each branch updates its rows of the accumulators
    itself, so no branch builds padding (a shape-only constant) for rows it does not touch."""
    k, v, k_ids = kv

    def own():
        return merge(out, lse, *kernel.forward(q, k, v, q_ids, k_ids, window, True))

    def earlier():  # all queries against the peer's first chunk
        return merge(out, lse, *kernel.forward(q, _halves(k)[0], _halves(v)[0], q_ids, _take(k_ids, 0),
                                               window, False))

    def later():  # our second chunk against the peer's whole block; our first chunk gets nothing
        block = kernel.forward(_halves(q)[1], k, v, _take(q_ids, 1), k_ids, window, False)
        out_2, lse_2 = merge(_halves(out)[1], _halves(lse)[1], *block)
        return _concat(_halves(out)[0], out_2), _concat(_halves(lse)[0], lse_2)

    return jax.lax.switch(case, (own, earlier, later))


def _step_backward(kernel, case, q, q_ids, kv, window, out, lse, dout, dq, dkv):
    """Add one ring step's gradients: dq of all local queries, (dk, dv) of the held peer block (f32)."""
    k, v, k_ids = kv
    dk, dv = dkv
    f32 = lambda x: x.astype(jnp.float32)

    def own():
        dq_b, dk_b, dv_b = kernel.backward(q, k, v, q_ids, k_ids, window, True, out, lse, dout)
        return dq + f32(dq_b), dk + f32(dk_b), dv + f32(dv_b)

    def earlier():
        dq_b, dk_b, dv_b = kernel.backward(q, _halves(k)[0], _halves(v)[0], q_ids, _take(k_ids, 0), window,
                                           False, out, lse, dout)
        add_first = lambda acc, d: _concat(_halves(acc)[0] + f32(d), _halves(acc)[1])
        return dq + f32(dq_b), add_first(dk, dk_b), add_first(dv, dv_b)

    def later():
        dq_b, dk_b, dv_b = kernel.backward(_halves(q)[1], k, v, _take(q_ids, 1), k_ids, window, False,
                                           _halves(out)[1], _halves(lse)[1], _halves(dout)[1])
        return _concat(_halves(dq)[0], _halves(dq)[1] + f32(dq_b)), dk + f32(dk_b), dv + f32(dv_b)

    dq, dk, dv = jax.lax.switch(case, (own, earlier, later))
    return dq, (dk, dv)


def _ring_position(size: int, step):
    """(this shard's index, which case the block held at `step` is) for _step_forward/_step_backward."""
    shard = jax.lax.axis_index(AXIS) if size > 1 else 0
    source = (shard - step) % size
    return jnp.where(step == 0, 0, jnp.where(source < shard, 1, 2))


def _pass_on(tree, size: int):
    if size == 1:  # no ring (and no axis to name outside a shard_map)
        return tree
    perm = [(s, (s + 1) % size) for s in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), tree)


def _varying_with(x, ids):
    """`ids` plus a zero computed from x. Under the decoder's layer scan the ids are the same for every
    layer, and JAX's scan partial evaluation would hoist every ring step's block masks (and its switch's
    placeholder outputs) out of the scan and keep them all: memory quadratic in T. A dependence on this
    layer's queries keeps the masks inside the step, built and dropped block by block. (An
    optimization_barrier does not do it: its partial evaluation lets the known operands through.)"""
    first = x.reshape(-1)[0]
    zero = jnp.minimum((first != first).astype(jnp.int32), 0)  # 0 for every value, NaN included
    return tuple(i + zero for i in ids)


def _ring_forward(kernel, size, q, k, v, ids, window):
    ids = _varying_with(q, ids)
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], NEG_INF, jnp.float32)

    def accumulate(carry, step):
        out, lse, kv = carry
        out, lse = _step_forward(kernel, _ring_position(size, step), q, ids, kv, window, out, lse)
        return (out, lse, kv), None

    def step_and_pass(carry, step):
        (out, lse, kv), _ = accumulate(carry, step)
        return (out, lse, _pass_on(kv, size)), None

    carry, _ = jax.lax.scan(step_and_pass, (out, lse, (k, v, ids)), jnp.arange(size - 1))
    (out, lse, _), _ = accumulate(carry, size - 1)
    return out, lse


def _ring_backward(kernel, size, q, k, v, ids, window, out, lse, dout):
    ids = _varying_with(q, ids)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

    def accumulate(carry, step):
        dq, kv, dkv = carry
        dq, dkv = _step_backward(kernel, _ring_position(size, step), q, ids, kv, window, out, lse, dout, dq, dkv)
        return (dq, kv, dkv), None

    def step_and_pass(carry, step):
        (dq, kv, dkv), _ = accumulate(carry, step)
        return (dq, _pass_on(kv, size), _pass_on(dkv, size)), None

    carry, _ = jax.lax.scan(step_and_pass, (zeros(q), (k, v, ids), (zeros(k), zeros(v))),
                            jnp.arange(size - 1))
    (dq, _, dkv), _ = accumulate(carry, size - 1)
    dk, dv = _pass_on(dkv, size)  # the block's gradient goes home: one more hop
    return dq, dk, dv


def make_ring_attention(size: int, scale: float, softcap: float | None, kernel: BlockKernel | None = None,
                        shard=lambda f, in_specs, out_specs: f):
    """(q [b,t,k,g,h], k/v [b,t,k,h], ids (segment, branch, positions) [b,t], window int32 scalar)
    -> out [b,t,k,g,h] in q's dtype, with the ring backward as its VJP. `shard(f, in_specs, out_specs)`
    wraps the forward and backward rings (a shard_map over AXIS with `size` shards; identity for size 1).

    The custom VJP sits outside the shard_maps, so they are only ever evaluated, never differentiated."""
    kernel = kernel or xla_blocks(scale, softcap)
    forward_ring = shard(lambda q, k, v, ids, window: _ring_forward(kernel, size, q, k, v, ids, window),
                         ("q", "kv", "kv", "ids", "scalar"), ("q", "lse"))
    backward_ring = shard(lambda q, k, v, ids, window, out, lse, dout: _ring_backward(
        kernel, size, q, k, v, ids, window, out, lse, dout), ("q", "kv", "kv", "ids", "scalar", "q", "lse", "q"),
        ("q", "kv", "kv"))

    @jax.custom_vjp
    def ring(q, k, v, ids, window):
        return forward_ring(q, k, v, ids, window)[0].astype(q.dtype)

    def forward(q, k, v, ids, window):
        out, lse = forward_ring(q, k, v, ids, window)
        return out.astype(q.dtype), (q, k, v, ids, window, out, lse)

    def backward(residuals, dout):
        q, k, v, ids, window, out, lse = residuals
        dq, dk, dv = backward_ring(q, k, v, ids, window, out, lse, dout.astype(jnp.float32))
        no_grad = jax.tree.map(lambda x: None, (ids, window))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + no_grad

    ring.defvjp(forward, backward)
    return ring


def ring_attention(q, k, v, *, segment_ids, branch_ids, positions, scale, logit_softcap=None,
                   sliding_window=None, kernel: BlockKernel | None = None):
    """q [B,T,N,H], k/v [B,T,K,H] (T in zigzag order when the mesh splits `sequence`), ids [B,T]
    -> [B,T,N,H] in q's dtype: DEVELOPING.md's attention rule in original token order.

    Under a mesh (jax.set_mesh) the tokens are split over `sequence`, rows over the batch axes and heads
    over `tensor` where they divide; without one (or sequence = 1) it is the same blockwise math on whole
    rows. `sliding_window` may be a traced per-layer scalar (None = no window)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv_heads} key/value heads")
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # query head n = kv_head * groups + g
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)
    ids = (segment_ids, branch_ids, positions)
    softcap = None if logit_softcap is None else float(logit_softcap)
    mesh = jax.sharding.get_abstract_mesh()
    size = 1 if mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]
    if t % (2 * size):
        raise ValueError(f"ring attention: rows of {t} tokens do not split into 2 * mesh.sequence = "
                         f"{2 * size} chunks (jaxdpo.parallel.sequence_parallel.check_row_length should have said)")
    if mesh.empty:
        return make_ring_attention(1, scale, softcap, kernel)(q, k, v, ids, window).reshape(b, t, n, h)
    rows, heads = shard_axes(mesh, "batch", b), shard_axes(mesh, "kv_heads", kv_heads)
    tokens = (AXIS,) if size > 1 else None
    spec = {"q": P(rows, tokens, heads, None, None), "kv": P(rows, tokens, heads, None),
            "lse": P(rows, tokens, heads, None), "ids": (P(rows, tokens),) * 3, "scalar": P()}

    def shard(f, in_names, out_names):
        return jax.shard_map(f, mesh=mesh, in_specs=tuple(spec[n] for n in in_names),
                             out_specs=tuple(spec[n] for n in out_names), check_vma=False)

    return make_ring_attention(size, scale, softcap, kernel, shard)(q, k, v, ids, window).reshape(b, t, n, h)
