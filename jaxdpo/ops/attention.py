"""Attention with segment / prefix-sharing / sliding-window masks.

`make_attention_mask` implements the one rule in DEVELOPING.md for every batch layout; `attention` is the
XLA reference path (einsum, fp32 softmax). GQA groups the query heads onto their shared K/V head with a
reshape, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdpo.config import ConfigError

BACKENDS = ("xla", "cudnn")
# cuDNN's fused attention: half-precision inputs, head_dim a multiple of 8 up to 256 (Hopper), no
# logit softcap, and only masks it builds itself (causal + per-row lengths + left sliding window).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256


def select_backend(requested: str, *, platform: str, layout: str, dtype, head_dim: int,
                   logit_softcap=None, sliding: bool = False) -> tuple[str, str]:
    """(backend to use, why): "cudnn" only where its fused kernel can express the run's mask exactly.

    The padded layout's mask is plain causal attention over a row's first `length` tokens (one sequence,
    prompt then one completion, padding at the end), which cuDNN builds from per-row lengths. The
    prefix_shared and packed layouts need segment and branch masks, which only the XLA path has."""
    if requested not in BACKENDS:
        raise ConfigError(f"model.attention = {requested!r}; choose one of {BACKENDS}")
    if requested == "xla":
        return "xla", "requested"
    reasons = []
    if platform != "gpu":
        reasons.append(f"cuDNN needs an NVIDIA GPU (this run is on {platform})")
    if layout != "padded":
        reasons.append(f"data.layout={layout} needs segment/branch masks (cuDNN takes causal+padding "
                       f"only: use data.layout=padded)")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        reasons.append(f"compute dtype {jnp.dtype(dtype).name} (cuDNN attention takes bfloat16/float16)")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} (cuDNN needs a multiple of 8, at most {CUDNN_MAX_HEAD_DIM})")
    if logit_softcap is not None:
        reasons.append("attention logit softcap (Gemma 2) is not in cuDNN's kernel")
    if sliding:
        reasons.append("sliding-window layers pick their window inside the layer scan (cuDNN needs it static)")
    if reasons:
        return "xla", "model.attention=cudnn falls back to the XLA path: " + "; ".join(reasons)
    return "cudnn", "requested; causal + padding mask"


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


def attention(q, k, v, *, mask=None, scale, logit_softcap=None, backend="xla", seq_lengths=None,
              sliding_window=None):
    """q [B,T,N,H], k/v [B,S,K,H] (N a multiple of K), mask [B,1|N,T,S] bool -> [B,T,N,H] in q's dtype.

    backend "cudnn" ignores `mask` and applies causal attention over each row's first `seq_lengths[b]`
    tokens (plus `sliding_window`): only call it where `select_backend` said that is the mask.
    Fully masked query rows (padding) give a finite, meaningless output; callers ignore those positions."""
    if backend == "cudnn":
        return cudnn_attention(q, k, v, scale=scale, seq_lengths=seq_lengths, sliding_window=sliding_window)
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


def cudnn_attention(q, k, v, *, scale, seq_lengths=None, sliding_window=None):
    """Causal (+ padding, + left sliding window) attention with cuDNN's fused kernel; GQA as is."""
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths,
        local_window_size=window, implementation="cudnn").astype(q.dtype)


def padding_lengths(segment_ids):
    """[B,T] -> [B] int32 tokens before the padding (the cuDNN path's per-row length)."""
    return jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
