"""DPO-aware FLOPs of a batch and model FLOPs utilization (MFU).

Counted the usual way (multiply-add = 2 FLOPs; backward = 2x forward) on the tokens a layout really
feeds the model (padding excluded; the padded layout's prompt counts twice because it is run twice):

  forward   = 2 * matmul_params * tokens                        (q/k/v/o, MLP and the LM head)
            + sum over layers of 4 * heads * head_dim * visible  (QK^T and PV on the (q, k) pairs the
                                                                  attention mask allows: its real density)
  policy    = 3 * forward                                        (forward + backward)
  reference = forward, only when the reference model runs in the step (reference.mode device/host)

The embedding lookup is a gather, not a matmul, and is not counted (a tied LM head is).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.models.config import ModelConfig

# Dense matmul peaks (FLOP/s) by device kind substring, for bf16 (fp32 runs are measured against these
# too: the tensor cores are what a well-fed trainer is judged by).
DEVICE_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12,
    "B200": 2250e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul for every token fed (the per-layer projections)."""
    d, h = cfg.hidden_size, cfg.head_dim
    attention = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2  # q, o; k, v
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    return cfg.num_layers * (attention + mlp)


def matmul_params(cfg: ModelConfig) -> int:
    """Per-layer projections + LM head (what a plain LM forward multiplies every token by)."""
    return layer_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size


def visible_pairs(segment_ids, branch_ids, positions=None, sliding_window=None) -> int:
    """(query, key) pairs the attention mask of DEVELOPING.md allows, summed over rows (numpy)."""
    segment_ids, branch_ids = np.asarray(segment_ids), np.asarray(branch_ids)
    t = segment_ids.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    total = 0
    for r in range(segment_ids.shape[0]):  # row by row: a [T,T] mask at a time, never [R,T,T]
        seg, br = segment_ids[r], branch_ids[r]
        mask = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0) & causal
        mask &= (br[None, :] == 0) | (br[None, :] == br[:, None])
        if sliding_window is not None:
            pos = np.asarray(positions)[r]
            mask &= (pos[:, None] - pos[None, :]) < sliding_window
        total += int(mask.sum())
    return total


def forward_flops(cfg: ModelConfig, batch: dict) -> dict[str, float]:
    """Forward FLOPs of one micro-batch (a dict with segment_ids, branch_ids, positions [R,T])."""
    tokens = int((np.asarray(batch["segment_ids"]) != 0).sum())
    full = visible_pairs(batch["segment_ids"], batch["branch_ids"])
    sliding_layers = sum(cfg.layer_is_sliding) if cfg.sliding_window is not None else 0
    sliding = (visible_pairs(batch["segment_ids"], batch["branch_ids"], batch["positions"], cfg.sliding_window)
               if sliding_layers else 0)
    per_pair_of_layer = 4 * cfg.num_heads * cfg.head_dim
    attention = per_pair_of_layer * ((cfg.num_layers - sliding_layers) * full + sliding_layers * sliding)
    # The LM head runs only where a logprob counts (the batch's scored positions, see step.pair_logprobs).
    scored = int((np.asarray(batch["side"]) > 0).sum()) if "scored_index" in batch else tokens
    matmul = 2 * layer_matmul_params(cfg) * tokens + 2 * cfg.hidden_size * cfg.vocab_size * scored
    return {"tokens": tokens, "matmul": float(matmul), "attention": float(attention),
            "forward": float(matmul + attention)}


def step_flops(cfg: ModelConfig, micro_batches: list[dict], *, reference_forward: bool) -> dict[str, float]:
    """FLOPs of one optimizer step over its micro-batches, and per valid pair."""
    forward = sum(forward_flops(cfg, m)["forward"] for m in micro_batches)
    tokens = sum(forward_flops(cfg, m)["tokens"] for m in micro_batches)
    pairs = sum(int(np.asarray(m["pair_valid"]).sum()) for m in micro_batches)
    policy = 3 * forward
    reference = forward if reference_forward else 0.0
    total = policy + reference
    return {"policy": policy, "reference": reference, "total": total, "tokens": tokens, "pairs": pairs,
            "per_pair": total / max(pairs, 1)}


def mfu(flops_per_second: float, peak_flops_per_second: float | None) -> float | None:
    return None if not peak_flops_per_second else flops_per_second / peak_flops_per_second


def device_peak_flops(device=None) -> float | None:
    """The accelerator's published dense bf16 peak (per device), or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name in sorted(DEVICE_PEAK_BF16, key=len, reverse=True):  # most specific name first
        if name.lower() in kind.lower():
            return DEVICE_PEAK_BF16[name]
    return None


def measure_matmul_peak(dtype=jnp.float32, size: int = 1024, repeats: int = 5, device=None) -> float:
    """FLOP/s of a jitted square matmul chain on one device, the best of `repeats` timings: the peak this
    machine reaches on the operation a transformer spends its time in (for MFU on CPU)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    chain = 8

    @jax.jit
    def run(x):
        for _ in range(chain):  # dependent matmuls, scaled to stay finite
            x = (x @ a) * (1.0 / size ** 0.5)
        return x

    run(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return chain * 2 * size ** 3 / best
