"""Rows split along their tokens over the `sequence` mesh axis: the zigzag token order and its checks.

With S = mesh.sequence, a row of T tokens is cut into 2S chunks of T/(2S) tokens and shard i holds chunks
i and 2S-1-i (zigzag order). Under causal attention chunk c has c+1 chunks of keys to look at, so each
shard's pair of chunks costs (i+1) + (2S-i) = 2S+1 chunk-blocks: every shard does the same attention
work. Within a shard the tokens stay in increasing original order (chunk i comes before chunk 2S-1-i).

The permutation is applied to the row arrays on the host, before the model: `input_ids`, `positions`,
`segment_ids`, `branch_ids`, `targets`, `pair_index` and `side` move together, so RoPE (positions),
sliding windows (positions), segment and branch masks (ids) see exactly what they would see in the
original order, and per-pair logprob sums (`ops.logprobs.pair_sums`) do not depend on token order.
Only causality needs the original index, which ring attention knows from the layout itself
(jaxdpo/ops/ring_attention.py).
"""

from __future__ import annotations

import math

import numpy as np

from jaxdpo.data.layouts import ROW_KEYS
from jaxdpo.errors import ConfigError


def row_multiple(sequence: int) -> int:
    """Row lengths must be a multiple of this: 2 chunks per shard."""
    return 2 * sequence


def zigzag_order(length: int, sequence: int) -> np.ndarray:
    """[T] int32: the original token index held at each slot of the zigzag row (shard-major)."""
    chunks = 2 * sequence
    if length % chunks:
        raise ValueError(f"a row of {length} tokens cannot be cut into {chunks} equal chunks (mesh.sequence = "
                         f"{sequence}); row lengths must be multiples of {chunks}")
    size = length // chunks
    order = [c for shard in range(sequence) for c in (shard, chunks - 1 - shard)]
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order]).astype(np.int32)


def inverse_order(order: np.ndarray) -> np.ndarray:
    """The permutation that puts a zigzag row back in original order."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=order.dtype)
    return inverse


def to_zigzag(batch: dict, sequence: int) -> dict:
    """A (micro-)batch (DEVELOPING.md format, any leading axes) with its row arrays in zigzag order; pair
    arrays unchanged. `scored_index` becomes per shard (`shard_scored_index`)."""
    out = dict(batch)
    if sequence == 1:
        return out
    order = zigzag_order(np.shape(batch["input_ids"])[-1], sequence)
    for key in ROW_KEYS:
        out[key] = np.take(np.asarray(batch[key]), order, axis=-1)
    if "scored_index" in batch:
        out["scored_index"] = shard_scored_index(out["side"], sequence, np.shape(batch["scored_index"])[-1])
    return out


def shard_scored_index(side: np.ndarray, sequence: int, slots: int) -> np.ndarray:
    """[..., T] zigzag `side` -> [..., S, k] int32: the scored positions each sequence shard holds, as
    indices into its own T/S tokens (-1 = empty slot), k = min(slots, T/S). The step gathers them where
    they live (ops.logprobs.gather_scored), so no device sees another shard's hidden states, and each
    shard runs the LM head on its own k positions."""
    from jaxdpo.data.layouts import scored_index

    side = np.asarray(side)
    lead, length = side.shape[:-1], side.shape[-1]
    per_shard = min(slots, length // sequence)
    index = scored_index(side.reshape(-1, length // sequence), per_shard)
    return index.reshape(lead + (sequence, per_shard))


def check_row_length(row_length: int, sequence: int, *, key: str) -> None:
    """ConfigError (one line, naming `key`) unless rows of `row_length` split into 2*sequence chunks."""
    multiple = row_multiple(sequence)
    if sequence > 1 and row_length % multiple:
        raise ConfigError(
            f"{key} = {row_length} must be a multiple of 2 * mesh.sequence = {multiple} (each of the "
            f"{sequence} sequence shards holds two equal chunks of a row); use "
            f"{math.ceil(row_length / multiple) * multiple} or change mesh.sequence")


def check_config(config) -> None:
    """Rows must cut into 2 * mesh.sequence equal chunks. The padded and packed row lengths are known from
    the config; prefix_shared rows are sized from the data and rounded up to that multiple when built."""
    sequence, data = config.mesh.sequence, config.data
    if data.layout == "padded":
        check_row_length(data.max_length, sequence, key="data.max_length")
    elif data.layout == "packed":
        key = "data.pack_length" if data.pack_length else "data.pack_length (0: 2 * data.max_length)"
        check_row_length(data.pack_length or 2 * data.max_length, sequence, key=key)
