"""What one training example is, for every loss: a prompt with N >= 1 completions.

A pair is a prompt with two completions in order of preference (chosen, rejected). An unpaired row is a
prompt with one completion and a label (desirable or not), as TRL's unpaired format holds it. The
batcher and the layouts see an example as a tuple `(prompt, completion_1, ..., completion_N)` of token
ids; completion k is scored on `side` k of the batch (slot k). Pairs and unpaired rows have one N per
dataset and the step sums slots 1 and 2; groups may differ in N, the batch has slots 1..N for the largest
N of the dataset and the step sums all of them ([P, N]). What the slots mean is the loss's business:

  PAIR      slot 1 = chosen, slot 2 = rejected.
  UNPAIRED  slot 1 = the row's completion; slot 2 = its KL completion when the loss estimates KTO's KL
            term (another row's completion after this row's prompt), else absent (N = 1). The batch
            also carries `label` [P] (1 = desirable).
  GROUP     slot k = the group's completion k (tokenize.TokenizedGroups). The batch also carries
            `group_scores` [P, N] and `group_mask` [P, N] (1 where the group has completion k).

KTO's KL completions are formed here, when the data is prepared, as TRL 1.16's KTOTrainer forms them: in
data order, the completions cycled by one within consecutive chunks of the batch size (row i of a chunk
gets the completion of row i - 1, the first row the last one's). They are fixed per row, so a cached
reference computes their logprobs once, with the rows'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdpo.data.formats import ExampleKind
from jaxdpo.data.tokenize import TokenizedGroups, TokenizedPairs

__all__ = ["ExampleKind", "UnpairedExamples", "ExampleTuples", "as_examples", "kl_partners", "pairs_of_origin"]


def kl_partners(num_rows: int, chunk: int) -> np.ndarray:
    """partner[i]: the row whose completion follows row i's prompt in its KL row. Within each consecutive
    chunk [s, s + n) of `chunk` rows (the last may be shorter) row s gets row s + n - 1, row i > s row i - 1."""
    index = np.arange(num_rows)
    start = (index // chunk) * chunk
    size = np.minimum(start + chunk, num_rows) - start
    return (start + (index - start - 1) % size).astype(np.int64)


class UnpairedExamples:
    """Tokenized unpaired rows (tokenize.TokenizedRows) as batcher examples: `examples[i]` is
    (prompt, completion) or, with KL completions, (prompt, completion, partner's completion), each
    completion cut to the room the prompt leaves in `max_length` (a KL row is cut as TRL cuts
    prompt + partner's completion, from the right)."""

    def __init__(self, rows, *, max_length: int, kl_chunk: int | None):
        self.rows = rows
        self.max_length = max_length
        self.partners = None if kl_chunk is None else kl_partners(len(rows), kl_chunk)
        self.labels = np.asarray(rows.labels, bool)

    kind = ExampleKind.UNPAIRED

    @property
    def source(self) -> list[tuple[str, int]]:
        return self.rows.source

    @property
    def completions(self) -> int:
        return 1 if self.partners is None else 2

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        prompt = self.rows.prompt_ids[i]
        room = self.max_length - len(prompt)
        own = self.rows.completion_ids[i][:room]
        if self.partners is None:
            return prompt, own
        return prompt, own, self.rows.completion_ids[self.partners[i]][:room]

    def example_arrays(self, indices: Sequence[int], size: int) -> dict[str, np.ndarray]:
        """The per-example arrays a batch of these examples carries besides the rows: `label` [size]
        (1 = desirable; 0 on the padding examples after `indices`)."""
        label = np.zeros((size,), np.int32)
        label[:len(indices)] = self.labels[np.asarray(indices, np.int64)]
        return {"label": label}


class ExampleTuples:
    """A plain sequence of (prompt, *completions) id tuples as batcher examples (tests and tools build
    batches so): N from the first one (2 when empty), no per-example arrays."""

    def __init__(self, examples: Sequence[tuple]):
        self.examples = examples
        self.completions = len(examples[0]) - 1 if len(examples) else 2

    kind = ExampleKind.PAIR  # tests and tools batch pairs this way

    @property
    def source(self) -> list[tuple[str, int]]:
        return [("", i) for i in range(len(self.examples))]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple:
        return self.examples[i]

    def example_arrays(self, indices: Sequence[int], size: int) -> dict[str, np.ndarray]:
        del indices, size
        return {}


def as_examples(data):
    """`data` as batcher examples: TokenizedPairs, TokenizedGroups and UnpairedExamples are; a plain sequence
    of tuples is wrapped."""
    examples = (TokenizedPairs, TokenizedGroups, UnpairedExamples, ExampleTuples)
    return data if isinstance(data, examples) else ExampleTuples(data)


def pairs_of_origin(rows) -> np.ndarray:
    """[K, 2] indices (desirable, undesirable) of the rows that came from one pair (they share its file
    and row); rows from unpaired files form none. Lets eval report the pairs' reward accuracy."""
    seen: dict[tuple[str, int], list[int]] = {}
    for i, where in enumerate(rows.source):
        seen.setdefault(where, []).append(i)
    labels = np.asarray(rows.labels, bool)
    pairs = [(a, b) if labels[a] else (b, a) for members in seen.values() if len(members) == 2
             for a, b in [members] if labels[a] != labels[b]]
    return np.asarray(pairs, np.int64).reshape(-1, 2)
