"""Attention with segment / prefix-sharing / sliding-window masks.

`make_attention_mask` implements the one rule in DEVELOPING.md for every batch layout; `attention` is the
XLA reference path (einsum, fp32 softmax). GQA groups the query heads onto their shared K/V head with a
reshape, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla",)


def make_attention_mask(segment_ids, branch_ids, positions, sliding_window=None):
    """[B,T] ids -> [B,1,T,T] bool: query q may see key k iff
    segment_ids[q] == segment_ids[k] != 0, k <= q, branch_ids[k] in (0, branch_ids[q]),
    and (sliding layers) positions[q] - positions[k] < sliding_window.
    `sliding_window` may be a traced scalar (per-layer window inside a scan)."""
    t = segment_ids.shape[-1]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    mask = (seg_q == seg_k) & (seg_q != 0) & causal[None] & ((br_k == 0) | (br_k == br_q))
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    return mask[:, None]


def attention(q, k, v, *, mask=None, scale, logit_softcap=None, backend="xla"):
    """q [B,T,N,H], k/v [B,S,K,H] (N a multiple of K), mask [B,1|N,T,S] bool -> [B,T,N,H] in q's dtype.

    Fully masked query rows (padding) give a finite, meaningless output; callers ignore those positions."""
    if backend != "xla":
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {BACKENDS}")
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv_heads} key/value heads")
    groups = n // kv_heads
    # query head n = kv_head * groups + g, the order transformers' repeat_kv uses
    q_grouped = q.reshape(b, t, kv_heads, groups, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_grouped, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    if mask is not None:
        mask_heads = mask.shape[1]
        mask = mask.reshape(b, 1, 1, t, -1) if mask_heads == 1 else mask.reshape(b, kv_heads, groups, t, -1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h).astype(q.dtype)
