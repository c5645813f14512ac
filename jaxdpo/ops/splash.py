"""Splash attention (the Pallas TPU flash-attention kernel) for the attention rule of DEVELOPING.md.

Splash masks with a static causal mask AND'ed with segment ids (q sees k iff q_ids[q] == kv_ids[k]).

  padded layout  one call, ids = segment_ids (padding = segment 0). A padded row holds one sequence with
                 one completion, so its branch ids change nothing (`splash_attention`).
  prefix_shared  "the prompt is visible to both branches, chosen is hidden from rejected" is not a
  / packed       segment-id equality, so two calls whose masks partition the allowed set are merged by
                 their log-sum-exps (`splash_branch_attention`):
                   same    q_ids = kv_ids = 3*segment + branch   (prompt->prompt, chosen->chosen, ...)
                   cross   q_ids = 3*segment on completion tokens, kv_ids = 3*segment on prompt tokens,
                           and values no id can equal elsewhere   (completion -> its own prompt)
                 The merge needs its own backward: splash only returns its logsumexp from a forward that
                 is not differentiable, so `_merged` is a custom_vjp whose backward runs splash's two
                 backward kernels with the MERGED output and logsumexp as residuals (for the union
                 p_ij = exp(s_ij - l_i) and D_i = do_i . o_i are the merged ones; the ring-attention
                 identity). That backward entry point is private to JAX: `merged_backward_problem()` checks
                 its signature, and `select_backend` falls back to XLA with that reason if it changed.

Shapes: q [B,T,N,H], k/v [B,T,K,H]. The kernel runs per example ([N,T,H], vmapped over B) and takes GQA
as is (query head n reads kv head n // (N/K), the order of transformers' repeat_kv). It needs T a multiple
of its 128-token blocks and is laid out in 128-lane tiles, so T is padded with padding tokens (segment 0,
after every real token, so causality hides them from real queries) and head_dim with zero columns (they add
nothing to q.k and come out as zero output columns); both are sliced off again. Splash takes no scale: q is
multiplied by it first. Under a mesh the Pallas call cannot be partitioned by GSPMD, so it runs inside
`jax.shard_map` with rows over the batch axes and heads over the tensor axis of LOGICAL_AXIS_RULES.

On any platform but TPU the kernel runs in Pallas interpret mode (same kernel logic, slow), which is how
the tests check it on CPU.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec as P

from jaxdpo.parallel.sharding import LOGICAL_AXIS_RULES

LANES = 128  # TPU vector lanes: the kernel's sequence blocks are multiples of this; head_dim is padded to it
BLOCK_CHOICES = (512, 256, 128)  # largest that divides the padded T (bigger blocks: fewer grid steps)
DTYPES = (jnp.float32, jnp.bfloat16)

# Ids the two merged calls use where a token must match nothing (every real id is 3*segment + branch >= 0).
_NO_QUERY, _NO_KEY = -1, -2

# `splash_attention_kernel._splash_attention_bwd` as of JAX 0.10: the kernel's nondiff args, then the
# residuals tuple (q, k, v, segment_ids, sinks, out, logsumexp, dq_mask_info, dkv_mask_info) and `do`.
_BWD_PARAMS = ("save_residuals", "mask_value", "is_mqa", "block_sizes", "residual_checkpoint_name",
               "mask_function", "attn_logits_soft_cap", "interpret", "res", "do")
_RESIDUAL_FIELDS = 9


@functools.cache
def merged_backward_problem() -> str | None:
    """None if this JAX's splash backward can be run with our own residuals, else why not."""
    bwd = getattr(splash_kernel, "_splash_attention_bwd", None)
    if bwd is None:
        return "this JAX's splash kernel has no _splash_attention_bwd (the merged backward needs it)"
    try:
        params = tuple(inspect.signature(bwd).parameters)
    except (TypeError, ValueError):
        return "could not read the signature of splash's _splash_attention_bwd"
    if params != _BWD_PARAMS:
        return f"splash's _splash_attention_bwd{params} differs from the JAX 0.10 signature the merge was written for"
    residuals = getattr(getattr(splash_kernel, "SplashResidualsType", None), "__args__", ())
    if len(residuals) != _RESIDUAL_FIELDS:
        return (f"splash's residual tuple has {len(residuals)} fields (the merge was written for "
                f"{_RESIDUAL_FIELDS}: q, k, v, segment_ids, sinks, out, logsumexp, dq/dkv mask info)")
    return None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_size(seq_len: int) -> int:
    """Largest of BLOCK_CHOICES dividing seq_len (a multiple of 128)."""
    return next(b for b in BLOCK_CHOICES if seq_len % b == 0)


def _kernel(seq_len: int, q_heads: int, *, softcap, save_residuals: bool, interpret: bool):
    """A causal splash kernel over [q_heads, seq_len, head_dim] with segment ids given per call.

    Built at trace time (its mask info is numpy work that `_process_mask` caches); GQA needs no MQA kernel:
    splash's MHA kernel takes k/v with fewer heads than q."""
    block = block_size(seq_len)
    sizes = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                     block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                     block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * q_heads)
    return splash_kernel.make_splash_mha(mask, block_sizes=sizes, save_residuals=save_residuals,
                                         attn_logits_soft_cap=softcap, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)


# ---- one example: q [N,T,H], k/v [K,T,H], ids [T] -----------------------------------------------------

def _single(q, k, v, ids, *, softcap, interpret):
    kernel = _kernel(q.shape[1], q.shape[0], softcap=softcap, save_residuals=False, interpret=interpret)
    return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=ids, kv=ids))


def _forward_with_lse(q, k, v, q_ids, kv_ids, *, softcap, interpret):
    kernel = _kernel(q.shape[1], q.shape[0], softcap=softcap, save_residuals=True, interpret=interpret)
    out, (lse,) = kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=q_ids, kv=kv_ids))
    return out.astype(jnp.float32), lse  # lse [N,T] float32


def _merge(out_same, lse_same, out_cross, lse_cross):
    """Softmax over the union of two disjoint key sets from each part's normalized output and logsumexp.
    A query with no cross keys (a prompt token, padding) has lse_cross = mask_value + log(#keys), about
    -2.4e38: its weight is exactly 0 and it takes the same-branch result."""
    has_cross = lse_cross > 0.5 * splash_kernel.DEFAULT_MASK_VALUE
    lse = jnp.where(has_cross, jnp.logaddexp(lse_same, lse_cross), lse_same)
    w_same = jnp.exp(lse_same - lse)[..., None]
    w_cross = jnp.where(has_cross, jnp.exp(lse_cross - lse), 0.0)[..., None]
    return w_same * out_same + w_cross * out_cross, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _merged(q, k, v, same_ids, cross_q_ids, cross_kv_ids, softcap, interpret):
    out, _ = _merged_fwd(q, k, v, same_ids, cross_q_ids, cross_kv_ids, softcap, interpret)
    return out


def _merged_fwd(q, k, v, same_ids, cross_q_ids, cross_kv_ids, softcap, interpret):
    out_same, lse_same = _forward_with_lse(q, k, v, same_ids, same_ids, softcap=softcap, interpret=interpret)
    out_cross, lse_cross = _forward_with_lse(q, k, v, cross_q_ids, cross_kv_ids, softcap=softcap,
                                             interpret=interpret)
    out, lse = _merge(out_same, lse_same, out_cross, lse_cross)
    out = out.astype(q.dtype)
    return out, (q, k, v, same_ids, cross_q_ids, cross_kv_ids, out, lse)


def _part_backward(kernel, q, k, v, segment_ids, out, lse, do):
    """Splash's own backward kernels for one part, with the merged out/lse as its residuals."""
    def collapse(info):  # what splash's jitted entry does to mask info before its custom_vjp sees it
        if info is None or info.partial_mask_blocks is None:
            return info
        blocks = info.partial_mask_blocks
        return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))

    residuals = (q, k, v, segment_ids, None, out, lse, collapse(kernel.dq_mask_info),
                 collapse(kernel.dkv_mask_info))
    grads = splash_kernel._splash_attention_bwd(**kernel.kwargs, res=residuals, do=do)
    # (fwd_mask_info, dq_mask_info, dkv_mask_info, dq, dk, dv, segment_ids, sinks) as of JAX 0.10
    return grads[3:6]


def _merged_bwd(softcap, interpret, residuals, do):
    q, k, v, same_ids, cross_q_ids, cross_kv_ids, out, lse = residuals
    kernel = _kernel(q.shape[1], q.shape[0], softcap=softcap, save_residuals=False, interpret=interpret)
    parts = [(same_ids, same_ids), (cross_q_ids, cross_kv_ids)]
    grads = [_part_backward(kernel, q, k, v, splash_kernel.SegmentIds(q=q_ids, kv=kv_ids), out, lse, do)
             for q_ids, kv_ids in parts]
    dq, dk, dv = (a.astype(jnp.float32) + b.astype(jnp.float32) for a, b in zip(*grads))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_merged.defvjp(_merged_fwd, _merged_bwd)


def branch_ids_for_merge(segment_ids, branch_ids):
    """[...,T] segment/branch ids -> (same, cross_q, cross_kv) ids of the two merged calls."""
    same = 3 * segment_ids + branch_ids
    real = segment_ids != 0
    cross_q = jnp.where(real & (branch_ids != 0), 3 * segment_ids, _NO_QUERY)
    cross_kv = jnp.where(real & (branch_ids == 0), 3 * segment_ids, _NO_KEY)
    return same, cross_q, cross_kv


# ---- batched entry points -----------------------------------------------------------------------------

def _batched(q, k, v, segment_ids, branch_ids, *, scale, softcap, interpret):
    """Per-shard body: [B,T,N,H] q, [B,T,K,H] k/v, [B,T] ids -> [B,T,N,H]. branch_ids None = one call."""
    b, t, n, h = q.shape
    t_pad, h_pad = _round_up(t, LANES), _round_up(h, LANES)

    def heads_first(x):  # [B,T,heads,H] -> [B,heads,T_pad,H_pad]
        x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, h_pad - h)))
        return jnp.einsum("btnh->bnth", x)

    qh = heads_first(q * jnp.asarray(scale, q.dtype))
    kh, vh = heads_first(k), heads_first(v)
    pad_ids = lambda ids: jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)))  # padding: segment 0
    if branch_ids is None:
        per_example = functools.partial(_single, softcap=softcap, interpret=interpret)
        out = jax.vmap(per_example)(qh, kh, vh, pad_ids(segment_ids))
    else:
        same, cross_q, cross_kv = branch_ids_for_merge(pad_ids(segment_ids), pad_ids(branch_ids))
        per_example = lambda *args: _merged(*args, softcap, interpret)
        out = jax.vmap(per_example)(qh, kh, vh, same, cross_q, cross_kv)
    return jnp.einsum("bnth->btnh", out)[:, :t, :, :h].astype(q.dtype)


def _shard_axes(mesh, logical: str, size: int):
    """Mesh axes of a logical name that exist in `mesh` and split `size` evenly; else None (replicate)."""
    axes = LOGICAL_AXIS_RULES[logical]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    ways = 1
    for a in axes:
        ways *= mesh.shape[a]
    if not axes or size % ways:
        return None
    return axes


def splash_attention(q, k, v, *, segment_ids, scale, branch_ids=None, logit_softcap=None, interpret=None):
    """q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] -> [B,T,N,H] in q's dtype.

    With `branch_ids` [B,T]: the full rule of DEVELOPING.md (two merged calls); without: causal attention
    within equal segment ids (exact for the padded layout). `interpret` defaults to "not on a TPU"."""
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"splash attention is self-attention over one row: q has {q.shape[1]} tokens, "
                         f"k/v {k.shape[1]}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if branch_ids is not None and merged_backward_problem():
        raise RuntimeError(f"splash with branch masks is unavailable: {merged_backward_problem()}; "
                           "ops.attention.select_backend should have chosen the XLA path")
    softcap = None if logit_softcap is None else float(logit_softcap)
    body = functools.partial(_batched, scale=scale, softcap=softcap, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return body(q, k, v, segment_ids, branch_ids)
    # Pallas calls are opaque to GSPMD: run each device's rows and heads as a manual shard.
    rows = _shard_axes(mesh, "batch", q.shape[0])
    heads = _shard_axes(mesh, "heads", k.shape[2])
    qkv_spec, ids_spec = P(rows, None, heads, None), P(rows, None)
    ids_args = (segment_ids,) if branch_ids is None else (segment_ids, branch_ids)

    def sharded(q, k, v, segment_ids, branch_ids=None):
        return body(q, k, v, segment_ids, branch_ids)

    return jax.shard_map(sharded, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * len(ids_args),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, *ids_args)
