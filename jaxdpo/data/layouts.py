"""Token ids of examples -> one micro-batch in the layout-independent format of DEVELOPING.md.

An example is (prompt, completion_1, ..., completion_N) (jaxdpo/data/examples.py): a pair is (prompt,
chosen, rejected); completion k is scored on side k and written on branch k (1..N).

  padded         N rows per example (N = the dataset's largest): rows (k-1)P..kP-1 hold prompt+completion_k
                 of examples 0..P-1, empty where an example has fewer (for pairs: rows 0..P-1
                 prompt+chosen, rows P..2P-1 prompt+rejected). T = data.max_length.
  prefix_shared  one row per example: prompt[:-1] | prompt[-1]+completion_1 | ... | prompt[-1]+completion_N,
  (= grouped)    every branch continuing the prompt's positions and seeing only the prompt and itself.
                 T = the smallest multiple of 8 >= the longest example of the dataset (for a pair P+C+R+1
                 tokens). `grouped` names the same rows for groups of N scored completions.
  packed         several prefix-shared examples per row (first-fit decreasing), segment ids 1..k per row.
                 T = data.pack_length (0 = 2*max_length); R = rows needed, rounded up to a multiple of
                 `row_multiple` so that few distinct shapes reach the compiler.

Truncation happened before (tokenize.py) and is the same for every layout, so each example's logprob sums
are the same whichever layout carries it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxdpo.data.formats import ExampleKind
from jaxdpo.errors import ConfigError

LAYOUTS = ("padded", "prefix_shared", "grouped", "packed")
ONE_ROW_PER_EXAMPLE = ("prefix_shared", "grouped")  # the prompt once, every completion a branch after it
ROW_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "targets", "pair_index", "side")
# What a step reads per row: the layout's rows plus the batcher's scored positions.
STEP_ROW_KEYS = ROW_KEYS + ("scored_index",)
# [P] arrays (one value per pair, not per row): the batcher adds pair_ids, the cached reference ref_*.
PAIR_KEYS = ("pair_valid", "ref_chosen", "ref_rejected", "pair_ids")
# Per-example arrays an example kind adds (examples.py): the margin [P] of pairs (which the reward objective
# reads and the preference losses do not), the label [P] of unpaired rows, the scores and completion mask
# [P, N] of groups.
EXAMPLE_KEYS = ("margin", "label", "group_scores", "group_mask")
KIND_KEYS = {ExampleKind.PAIR: (), ExampleKind.UNPAIRED: ("label",),
             ExampleKind.GROUP: ("group_scores", "group_mask")}
SHARED, CHOSEN, REJECTED = 0, 1, 2  # branch ids; CHOSEN/REJECTED double as `side` values


def shared_length(prompt, *completions) -> int:
    """Tokens of one prefix-shared example: prompt[:-1] + (prompt[-1] + completion) per completion; for a pair
    P+C+R+1."""
    return len(prompt) - 1 + sum(1 + len(c) for c in completions)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_length(pairs, layout: str, data_cfg, *, sequence: int = 1) -> int:
    """T for a dataset (TokenizedPairs or a list of (prompt, chosen, rejected)), known before training.
    With rows split over `sequence` (mesh.sequence) devices a prefix_shared T is also a multiple of
    2 * sequence, so that it cuts into the zigzag chunks (padded and packed T are checked in the config)."""
    max_length = int(data_cfg.max_length)
    if layout == "padded":
        return max_length
    longest = max((shared_length(*pairs[i]) for i in range(len(pairs))), default=8)
    if layout in ONE_ROW_PER_EXAMPLE:
        chunks = 2 * sequence
        return min(_round_up(longest, math.lcm(8, chunks)), _round_up(max(2 * max_length, longest), chunks))
    if layout == "packed":
        pack_length = int(data_cfg.get("pack_length", 0)) or 2 * max_length
        if longest > pack_length:
            raise ConfigError(f"data.pack_length={pack_length} is shorter than the longest pair ({longest} tokens "
                              f"as prompt+chosen+rejected+1); raise data.pack_length to at least {longest} "
                              "or lower data.max_length")
        return pack_length
    raise ConfigError(f"data.layout={layout!r}; use one of {LAYOUTS}")


def scored_slots(pairs, layout: str, row_length: int) -> int | None:
    """S, the static number of scored positions (those whose logprob counts) kept per row, for a dataset:
    a padded row scores one completion, a prefix_shared row both; None for packed, whose rows depend on
    the packing (the batcher works S out per step, as it does the row count)."""
    if layout == "packed":
        return None
    per_row = (lambda p: max(map(len, p[1:]))) if layout == "padded" else (lambda p: sum(map(len, p[1:])))
    longest = max((per_row(pairs[i]) for i in range(len(pairs))), default=1)
    return min(_round_up(max(longest, 1), 8), row_length)


def scored_index(side: np.ndarray, slots: int) -> np.ndarray:
    """[R,T] `side` -> [R,slots] int32: each row's scored positions (side > 0) in order, then -1.

    The step runs the LM head (and the logsumexp over the vocabulary) only at these positions: in a DPO
    row most tokens are prompt or padding, whose predictions no loss uses."""
    counted = np.asarray(side) > 0
    most = int(counted.sum(axis=1).max(initial=0))
    if most > slots:
        raise ValueError(f"a row has {most} scored positions, more than the {slots} slots given")
    index = np.full((counted.shape[0], slots), -1, np.int32)
    rows, cols = np.nonzero(counted)
    rank = np.cumsum(counted, axis=1)[rows, cols] - 1
    index[rows, rank] = cols
    return index


def pad_id_of(tokenizer) -> int:
    """The id written where a row holds no token: the padding of training rows and of prompts, and the slots
    after a sampled completion stopped. Attention masks those slots and no loss or logprob counts them, so
    any id of the vocabulary would do: the tokenizer's pad id when it has one, else 0 (always one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _empty_rows(num_rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    rows = {key: np.zeros((num_rows, length), np.int32) for key in ROW_KEYS}
    rows["input_ids"][:] = pad_id
    rows["targets"][:] = pad_id
    rows["pair_index"][:] = -1
    return rows


def _write(rows, r: int, start: int, ids, *, position: int, segment: int, branch: int, pair: int,
           side: int, scored_from: int) -> None:
    """Write one branch of a sequence at rows[r, start:]: tokens `ids`, positions from `position`.

    Token j predicts ids[j+1]; the prediction counts for (`pair`, `side`) when j+1 >= scored_from,
    i.e. when the target is a completion token.
    """
    n = len(ids)
    span = slice(start, start + n)
    rows["input_ids"][r, span] = ids
    rows["positions"][r, span] = np.arange(position, position + n)
    rows["segment_ids"][r, span] = segment
    rows["branch_ids"][r, span] = branch
    if n > 1:
        rows["targets"][r, start:start + n - 1] = ids[1:]
        scored = slice(start + max(scored_from - 1, 0), start + n - 1)
        rows["pair_index"][r, scored] = pair
        rows["side"][r, scored] = side


def _write_padded(rows, r: int, prompt, completion, *, pair: int, side: int) -> None:
    ids = np.concatenate([prompt, completion])
    _write(rows, r, 0, ids, position=0, segment=1, branch=SHARED, pair=pair, side=side,
           scored_from=len(prompt))
    # The completion tokens carry their side as branch id (the prompt stays shared); within one row
    # this changes no attention, and it keeps the meaning of branch_ids the same in every layout.
    rows["branch_ids"][r, len(prompt):len(ids)] = side


def _write_shared(rows, r: int, start: int, prompt, *completions, pair: int, segment: int) -> int:
    """One prefix-shared example at rows[r, start:]; returns the tokens written."""
    head = len(prompt) - 1
    _write(rows, r, start, prompt[:-1], position=0, segment=segment, branch=SHARED, pair=pair,
           side=0, scored_from=len(prompt))  # nothing scored: the shared part predicts prompt tokens only
    if head > 0:
        rows["targets"][r, start + head - 1] = prompt[-1]
    at = start + head
    for branch, completion in enumerate(completions, start=CHOSEN):
        ids = np.concatenate([prompt[-1:], completion])
        _write(rows, r, at, ids, position=head, segment=segment, branch=branch, pair=pair, side=branch,
               scored_from=1)
        at += len(ids)
    return at - start


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of the items in each row (items longer than a row raise)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > row_length:
            raise ConfigError(f"a pair of {lengths[i]} tokens does not fit a packed row of {row_length}; "
                              "raise data.pack_length")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


def make_batch(pairs: Sequence[tuple], *, layout: str, row_length: int, num_pairs: int, row_multiple: int = 1,
               pad_id: int = 0, num_rows: int | None = None, completions: int = 2) -> dict[str, np.ndarray]:
    """A micro-batch of `num_pairs` examples (the real ones first, then padding ones with pair_valid=0),
    each (prompt, *`completions` completions): pairs by default.

    `num_rows` (packed only) forces R, so that every process of a multi-process run builds the same
    shape; it must be >= the rows these examples need.
    """
    if len(pairs) > num_pairs:
        raise ValueError(f"{len(pairs)} pairs do not fit a micro-batch of {num_pairs}")
    pairs = [tuple(np.asarray(x, np.int32) for x in p) for p in pairs]
    pair_valid = np.zeros((num_pairs,), np.int32)
    pair_valid[:len(pairs)] = 1

    if layout == "padded":
        rows = _empty_rows(completions * num_pairs, row_length, pad_id)
        for p, (prompt, *example_completions) in enumerate(pairs):
            for k, completion in enumerate(example_completions):
                side, r = CHOSEN + k, k * num_pairs + p
                if len(prompt) + len(completion) > row_length:
                    raise ConfigError(f"pair of {len(prompt)}+{len(completion)} tokens exceeds the padded row "
                                      f"length {row_length}; the data was tokenized for a larger data.max_length")
                _write_padded(rows, r, prompt, completion, pair=p, side=side)
    elif layout in ONE_ROW_PER_EXAMPLE:
        rows = _empty_rows(num_pairs, row_length, pad_id)
        for p, example in enumerate(pairs):
            if shared_length(*example) > row_length:
                raise ConfigError(f"an example of {shared_length(*example)} tokens exceeds the "
                                  f"{layout} row length {row_length}; compute it with layouts.row_length")
            _write_shared(rows, p, 0, *example, pair=p, segment=1)
    elif layout == "packed":
        packing = pack_rows([shared_length(*p) for p in pairs], row_length)
        needed = max(_round_up(len(packing), row_multiple), row_multiple)
        if num_rows is None:
            num_rows = needed
        elif num_rows < len(packing) or num_rows % row_multiple:
            raise ValueError(f"num_rows={num_rows} cannot hold {len(packing)} packed rows "
                             f"(or is not a multiple of {row_multiple})")
        rows = _empty_rows(num_rows, row_length, pad_id)
        for r, members in enumerate(packing):
            start = 0
            # Keep the pairs of a row in their original order: it makes batches easy to read and test.
            for segment, p in enumerate(sorted(members), start=1):
                start += _write_shared(rows, r, start, *pairs[p], pair=p, segment=segment)
    else:
        raise ConfigError(f"data.layout={layout!r}; use one of {LAYOUTS}")
    rows["pair_valid"] = pair_valid
    return rows
