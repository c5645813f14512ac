"""Deterministic, resumable, per-process batches of examples (pairs or unpaired rows: jaxdpo/data/examples.py).

Global step s of a run lives in epoch e = s // steps_per_epoch. The epoch's order is a permutation drawn
from (seed, e), or the data's own order with `shuffle=False` (data.shuffle); step s takes the next
batch_size examples of that order, splits them into micro-batches of micro_batch_size examples, and this
process takes its contiguous 1/process_count of each micro-batch. So
the data of a step is a pure function of (seed, step): resuming at step k needs no saved iterator state,
and every process agrees on the global batch without talking to the others.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxdpo.data.examples import as_examples
from jaxdpo.data.layouts import (
    make_batch,
    pack_rows,
    scored_index,
    scored_slots,
    shared_length,
)
from jaxdpo.errors import ConfigError


def check_batch_sizes(batch_size: int, micro_batch_size: int) -> None:
    """A step is batch_size pairs in micro-batches of micro_batch_size: their ratio must be whole."""
    if batch_size % micro_batch_size:
        raise ConfigError(
            f"train.batch_size = {batch_size} must be a multiple of train.micro_batch_size = {micro_batch_size} "
            f"(their ratio is the gradient-accumulation count)")


class PairBatcher:
    """Batches of `pairs`: any examples (TokenizedPairs, examples.UnpairedExamples) with `len`, `[i]` ->
    (prompt, *completions), `completions` (N), `source` and `example_arrays(indices, size)`."""

    def __init__(self, pairs, *, layout: str, row_length: int, batch_size: int, micro_batch_size: int,
                 seed: int, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 row_multiple: int = 1, pad_id: int = 0):
        check_batch_sizes(batch_size, micro_batch_size)
        if micro_batch_size % process_count:
            raise ConfigError(f"train.micro_batch_size={micro_batch_size} does not split evenly over "
                              f"{process_count} processes")
        self.pairs = as_examples(pairs)
        self.layout = layout
        self.row_length = row_length
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.row_multiple = row_multiple
        self.pad_id = pad_id
        self.local_pairs = micro_batch_size // process_count  # P of every micro-batch this process builds
        self.static_slots = scored_slots(self.pairs, layout, row_length)  # None for packed: per step
        rows_per_pair = {"padded": self.pairs.completions, "prefix_shared": 1, "grouped": 1}.get(layout)
        if rows_per_pair is not None and (rows_per_pair * self.local_pairs) % row_multiple:
            raise ConfigError(f"a micro-batch of {self.local_pairs} pairs per process makes "
                              f"{rows_per_pair * self.local_pairs} {layout} rows, which do not split over the "
                              f"{row_multiple} batch shards of a process; make train.micro_batch_size / "
                              f"processes a multiple of {row_multiple // np.gcd(row_multiple, rows_per_pair)}")

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (the remainder of an epoch is not used: every step has batch_size pairs)."""
        steps = self.num_pairs // self.batch_size
        if steps == 0:
            raise ConfigError(f"the training data has {self.num_pairs} pairs, fewer than one batch of "
                              f"train.batch_size={self.batch_size}; lower the batch size or add data")
        return steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_pairs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

    def step_indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of `step` (all processes)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def _slices(self, indices: np.ndarray) -> list[np.ndarray]:
        """Each process's contiguous share of one global micro-batch (the last ones may be short)."""
        return [indices[k * self.local_pairs:(k + 1) * self.local_pairs] for k in range(self.process_count)]

    def _shape(self, micro_batches: list[np.ndarray]) -> tuple[int | None, int]:
        """(R or None, S) for these micro-batches: padded and prefix_shared rows have a fixed count and a
        dataset-wide S; packed R and S are the most any process needs for any of them, so that global
        arrays have one shape on every process and the micro-batches of a step stack. Each process can
        work it out alone, since every process holds the whole dataset. S is rounded up to 64 so that
        a packed run compiles few distinct shapes."""
        if self.layout != "packed":
            return None, self.static_slots
        needed_rows, slots = 1, 1
        for indices in micro_batches:
            for share in self._slices(indices):
                pairs = [self.pairs[int(i)] for i in share]
                packing = pack_rows([shared_length(*p) for p in pairs], self.row_length)
                needed_rows = max(needed_rows, len(packing))
                for members in packing:
                    slots = max(slots, sum(len(c) for m in members for c in pairs[m][1:]))
        num_rows = -(-needed_rows // self.row_multiple) * self.row_multiple
        return num_rows, min(-(-slots // 64) * 64, self.row_length)

    def _micro_batch(self, indices: np.ndarray, shape: tuple[int | None, int]) -> dict[str, np.ndarray]:
        num_rows, slots = shape
        my_indices = self._slices(indices)[self.process_index]
        mine = [self.pairs[int(i)] for i in my_indices]
        batch = make_batch(mine, layout=self.layout, row_length=self.row_length, num_pairs=self.local_pairs,
                           row_multiple=self.row_multiple, pad_id=self.pad_id, num_rows=num_rows,
                           completions=self.pairs.completions)
        batch.update(self.pairs.example_arrays(my_indices, self.local_pairs))
        batch["scored_index"] = scored_index(batch["side"], slots)
        # Dataset index of each pair of the micro-batch (-1 = padding pair): lets per-pair data computed
        # once per dataset (the cached reference logprobs) join the batch.
        batch["pair_ids"] = np.full((self.local_pairs,), -1, np.int32)
        batch["pair_ids"][:len(my_indices)] = my_indices
        return batch

    def train_batch(self, step: int) -> list[dict[str, np.ndarray]]:
        """The micro-batches of global step `step` for this process, all of one shape (they stack)."""
        indices = self.step_indices(step)
        micro = [indices[k:k + self.micro_batch_size] for k in range(0, self.batch_size, self.micro_batch_size)]
        shape = self._shape(micro)
        return [self._micro_batch(m, shape) for m in micro]

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every pair exactly once, in order; the last micro-batch is filled with pair_valid=0 pairs."""
        order = np.arange(self.num_pairs)
        for k in range(0, self.num_pairs, self.micro_batch_size):
            micro = order[k:k + self.micro_batch_size]
            yield self._micro_batch(micro, self._shape([micro]))

    def num_eval_batches(self) -> int:
        return -(-self.num_pairs // self.micro_batch_size)
