"""Host batches -> global device arrays: what the loop feeds the jitted steps.

The batcher (jaxdpo/data/batcher.py) gives each process its share of a step's micro-batches as numpy;
these functions stack them, let the reference add what it reads (cached logprobs), and make global
jax arrays with the step's shardings. Rows are split over the batch axes (`data`, `fsdp`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxdpo.data.layouts import EXAMPLE_KEYS, PAIR_KEYS, STEP_ROW_KEYS
from jaxdpo.parallel import sequence_parallel, sharding


# [P] arrays: one value per example, split over the batch axes like the rows' examples.
PER_EXAMPLE_KEYS = PAIR_KEYS + EXAMPLE_KEYS


def batch_keys(reference, example_keys=()) -> list[str]:
    """The keys a step reads: the rows, pair_valid, what the reference reads (cached logprobs) and the
    data's per-example arrays (`example_keys`: `label` of unpaired rows)."""
    return list(STEP_ROW_KEYS) + ["pair_valid"] + list(reference.batch_keys) + list(example_keys)


def batch_shardings(mesh, keys, *, stacked: bool) -> dict[str, NamedSharding]:
    """Rows [(A,) R, T] split over the batch axes and their tokens over `sequence`; pair arrays [(A,) P]
    over the batch axes; A (stacked micro-batches) is not split. With sequence > 1, scored_index is
    [(A,) R, S, k] (each shard's own scored positions; jaxdpo.parallel.sequence_parallel)."""
    lead = (None,) if stacked else ()
    rows = NamedSharding(mesh, sharding.logical_spec(*lead, "batch", "seq"))
    pairs = NamedSharding(mesh, sharding.logical_spec(*lead, "batch"))
    out = {k: (pairs if k in PER_EXAMPLE_KEYS else rows) for k in keys}
    if "scored_index" in out and sharding.sequence_axis_size(mesh) > 1:
        out["scored_index"] = NamedSharding(mesh, sharding.logical_spec(*lead, "batch", "seq", None))
    return out


def to_global(local: dict[str, np.ndarray], shardings: dict, pair_axis: int) -> dict:
    """Process-local numpy -> global jax arrays. Pair indices become global: this process's pairs
    sit after those of the processes before it. Rows split over the `sequence` axis go in zigzag
    order here, on the host (jaxdpo.parallel.sequence_parallel), so every step, eval and reference pass gets them
    that way."""
    sequence = sharding.sequence_axis_size(shardings["input_ids"].mesh)
    local = sequence_parallel.to_zigzag(local, sequence)
    n_pairs_local = local["pair_valid"].shape[pair_axis]
    offset = jax.process_index() * n_pairs_local
    if offset:
        local["pair_index"] = np.where(local["pair_index"] >= 0, local["pair_index"] + offset, -1)
    out = {}
    for key, sharding_ in shardings.items():
        value = local[key]
        if jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding_)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding_, value)
    return out


def stack_micro_batches(micro_batches: list[dict]) -> dict[str, np.ndarray]:
    """[A] dicts -> one dict of [A, ...] arrays; rows are padded to the longest micro-batch (packed
    layouts may need different row counts) with rows that count for no pair."""
    max_rows = max(m["input_ids"].shape[0] for m in micro_batches)
    out = {}
    for key in micro_batches[0]:
        parts = []
        for m in micro_batches:
            value = m[key]
            if key not in PER_EXAMPLE_KEYS and value.shape[0] < max_rows:
                fill = -1 if key == "pair_index" else 0
                pad = np.full((max_rows - value.shape[0],) + value.shape[1:], fill, value.dtype)
                value = np.concatenate([value, pad])
            parts.append(value)
        out[key] = np.stack(parts)
    return out


def train_batch(batcher, reference, step: int, shardings: dict) -> dict:
    """The global batch of `step`: its micro-batches stacked [A, ...], as the train step takes it."""
    micro = [reference.attach("train", m) for m in batcher.train_batch(step)]
    return to_global(stack_micro_batches(micro), shardings, pair_axis=1)


def eval_batches(batcher, reference, shardings: dict):
    """Every eval pair once, one global batch at a time."""
    for local in batcher.eval_batches():
        yield to_global(reference.attach("eval", local), shardings, pair_axis=0)
