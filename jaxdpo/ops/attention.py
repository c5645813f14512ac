"""Attention with segment / prefix-sharing / sliding-window masks.

`make_attention_mask` implements the one rule in DEVELOPING.md for every batch layout; `attention` is the
single entry every model calls: the XLA path (einsum, fp32 softmax; long rows in causal query blocks), or a
fused kernel that `select_backend` found to express the run's mask exactly (cuDNN on GPU, splash on TPU:
jaxdpo/ops/splash.py).
GQA groups the query heads onto their shared K/V head with a reshape, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdpo.errors import ConfigError
from jaxdpo.ops import splash
from jaxdpo.ops.ring_attention import ring_attention

BACKENDS = ("xla", "cudnn", "splash", "auto")  # what model.attention may request
# What `attention(backend=...)` runs: select_backend resolves a request to one of these. "splash" is one
# splash call masked by segment ids (the padded layout); "splash_branches" merges two calls to add the
# prefix-sharing branch mask (prefix_shared, packed).
# "sequence_parallel" is not requested by model.attention: it is what a mesh with sequence > 1 runs
# (zigzag ring attention, jaxdpo/ops/ring_attention.py), and it also runs whole rows exactly.
KERNELS = ("xla", "cudnn", "splash", "splash_branches", "sequence_parallel")
# cuDNN's fused attention: half-precision inputs, head_dim a multiple of 8 up to 256 (Hopper), no
# logit softcap, and only masks it builds itself (causal + per-row lengths + left sliding window).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256
# Splash (Pallas TPU kernel): float32/bfloat16 (float16 is not a TPU compute type); any head_dim (the
# wrapper pads it to the 128-lane width); logit softcap is a kernel argument; the sliding window is not
# expressible because the decoder picks it per layer inside the scan (a traced value).
SPLASH_DTYPES = (jnp.float32, jnp.bfloat16)


def select_backend(requested: str, *, platform: str, layout: str, dtype, head_dim: int,
                   logit_softcap=None, sliding: bool = False, groups: bool = False) -> tuple[str, str]:
    """(kernel to use, why): a fused kernel only where it expresses the run's mask exactly, else "xla".

    "cudnn" (GPU): the padded layout's mask is plain causal attention over a row's first `length` tokens
    (one sequence, prompt then one completion, padding at the end), which cuDNN builds from per-row
    lengths; the prefix_shared and packed layouts need segment and branch masks, which it cannot take.
    "splash" (TPU): causal + segment ids. The padded layout is one call ("splash"); prefix_shared and
    packed add the branch mask by merging two calls ("splash_branches", see jaxdpo/ops/splash.py), which
    uses a private backward entry of JAX's kernel and falls back to XLA if this JAX's differs.
    `groups`: examples are groups of N completions, branches 1..N in one row (grouped, prefix_shared,
    packed); the XLA and ring masks compare branch ids, so any N is exact; splash's merge encodes
    3*segment + branch (two branches), so it falls back to XLA; cuDNN takes the padded layout only.
    "auto": splash on TPU, cudnn on GPU, each only where it is exact; otherwise xla."""
    if requested not in BACKENDS:
        raise ConfigError(f"model.attention = {requested!r}; choose one of {BACKENDS}")
    if requested == "xla":
        return "xla", "requested"
    if requested == "auto":
        kernel = {"tpu": "splash", "gpu": "cudnn"}.get(platform)
        if kernel is None:
            return "xla", f"model.attention=auto: no fused attention kernel on {platform}; using the XLA path"
        backend, why = select_backend(kernel, platform=platform, layout=layout, dtype=dtype, head_dim=head_dim,
                                      logit_softcap=logit_softcap, sliding=sliding, groups=groups)
        return backend, f"model.attention=auto chose {backend}: {why.removeprefix('requested; ')}"
    if requested == "splash":
        return _select_splash(platform=platform, layout=layout, dtype=dtype, sliding=sliding, groups=groups)
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


def _select_splash(*, platform: str, layout: str, dtype, sliding: bool, groups: bool = False) -> tuple[str, str]:
    reasons = []
    if platform != "tpu":
        reasons.append(f"splash is a TPU kernel (this run is on {platform})")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SPLASH_DTYPES]:
        reasons.append(f"compute dtype {jnp.dtype(dtype).name} (splash takes float32/bfloat16)")
    if sliding:
        reasons.append("sliding-window layers pick their window inside the layer scan (splash needs a static "
                       "local mask)")
    if layout != "padded" and groups:
        reasons.append(f"data.layout={layout} with groups puts up to N branches in a row, and the merged splash "
                       "calls tell only two apart (use data.layout=padded)")
    elif layout != "padded" and splash.merged_backward_problem():
        reasons.append(f"data.layout={layout} needs the branch mask, which merges two splash calls, but "
                       f"{splash.merged_backward_problem()} (use data.layout=padded)")
    if reasons:
        return "xla", "model.attention=splash falls back to the XLA path: " + "; ".join(reasons)
    if layout == "padded":
        return "splash", "requested; causal + segment ids"
    return "splash_branches", (f"model.attention=splash with data.layout={layout}: two splash calls per layer "
                               "(same-branch, completion-to-prompt) merged by their logsumexps")


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
              sliding_window=None, segment_ids=None, branch_ids=None, positions=None):
    """q [B,T,N,H], k/v [B,S,K,H] (N a multiple of K), mask [B,1|N,T,S] bool -> [B,T,N,H] in q's dtype.

    The kernels ignore `mask` and build the mask from what `select_backend` found it to be:
    "cudnn": causal over each row's first `seq_lengths[b]` tokens (plus `sliding_window`);
    "splash": causal within equal `segment_ids` [B,T] (self-attention, S = T);
    "splash_branches": the full rule of DEVELOPING.md from `segment_ids` and `branch_ids` [B,T];
    "sequence_parallel": the full rule from segment_ids, branch_ids and `positions` [B,T] in zigzag order,
    rows split over the mesh's `sequence` axis; `sliding_window` may be a traced per-layer scalar.
    Fully masked query rows (padding) give a finite, meaningless output; callers ignore those positions."""
    if backend == "sequence_parallel":
        return ring_attention(q, k, v, segment_ids=segment_ids, branch_ids=branch_ids, positions=positions,
                              scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, scale=scale, seq_lengths=seq_lengths, sliding_window=sliding_window)
    if backend in ("splash", "splash_branches"):
        if segment_ids is None or (backend == "splash_branches" and branch_ids is None):
            raise ValueError(f"attention backend {backend!r} builds its mask from segment_ids"
                             f"{' and branch_ids' if backend == 'splash_branches' else ''}; pass them")
        if sliding_window is not None:
            raise ValueError("attention backend splash has no sliding window; select_backend picks xla for it")
        return splash.splash_attention(q, k, v, segment_ids=segment_ids, scale=scale, logit_softcap=logit_softcap,
                                       branch_ids=branch_ids if backend == "splash_branches" else None)
    if backend != "xla":
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {KERNELS}")
    if mask is None:
        return grouped_attention(q, k, v, scale=scale, logit_softcap=logit_softcap)
    return causal_blocked_attention(q, k, v, mask=mask, scale=scale, logit_softcap=logit_softcap)


# Query rows per block of causal_blocked_attention.
CAUSAL_BLOCK = 128


def causal_blocked_attention(q, k, v, *, mask, scale, logit_softcap=None, block: int = CAUSAL_BLOCK):
    """grouped_attention for self-attention under a causal mask (every mask make_attention_mask builds):
    query rows [s, e) can only see keys before e, so each block of `block` query rows is scored against
    the keys [0, e) alone instead of all T: about half the scores, softmax and backward of a long row,
    with the same values (the keys left out were masked, exp gives them exactly 0). Each block is
    rematerialized: the backward recomputes its [heads, block, e] scores from q, k, v instead of keeping
    them, so no layer holds a [heads, T, T] array for the backward pass. Query rows that see nothing
    (padding) average a shorter prefix, as meaningless as before."""
    t = q.shape[1]
    if t <= block:
        return grouped_attention(q, k, v, mask=mask, scale=scale, logit_softcap=logit_softcap)
    attend = jax.checkpoint(lambda q, k, v, mask: grouped_attention(q, k, v, mask=mask, scale=scale,
                                                                    logit_softcap=logit_softcap))
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outputs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[:, :, start:end, :end]))
    return jnp.concatenate(outputs, axis=1)


def grouped_attention(q, k, v, *, mask=None, scale, logit_softcap=None):
    """The XLA reference path: einsums with an fp32 softmax; grouped-query attention without repeating k, v
    (q [B,T,N,H], k/v [B,S,K,H])."""
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


def decode_attention(q, k_cache, v_cache, *, mask, scale, logit_softcap=None):
    """One new query token per row against a KV cache: q [B,1,N,H], k_cache [B,K,H,S], v_cache [B,K,S,H],
    mask [B,1,1,S] (True = visible) -> [B,1,N,H]; the values of grouped_attention.

    Both contractions are written as a broadcast multiply and a sum over a non-minor axis (H for the scores,
    S for the output) rather than as dots: with one query row each (b, kv head) pair is a [G,H] x [H,S]
    product, and XLA:CPU runs the B*K of them as a batched dot at a fraction of the memory bandwidth, while
    the fused multiply-and-sum reads each cache once, vectorized along its minor axis (DEVELOPING.md,
    Decode at batch 1 and 32)."""
    b, t, n, h = q.shape
    kv_heads = k_cache.shape[1]
    if t != 1 or n % kv_heads:
        raise ValueError(f"decode_attention: one query token and a multiple of {kv_heads} query heads, "
                         f"got q {q.shape}")
    q_grouped = q.reshape(b, kv_heads, n // kv_heads, h).astype(jnp.float32)
    scores = jnp.sum(q_grouped[..., None] * k_cache[:, :, None].astype(jnp.float32), axis=3) * scale  # [B,K,G,S]
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    scores = jnp.where(mask.reshape(b, 1, 1, -1), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.sum(probs[..., None] * v_cache[:, :, None], axis=3, dtype=jnp.float32)  # [B,K,G,H]
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
