"""Preference pairs from k judged completions per prompt: the best against the worst, ties broken by draws
that depend only on (seed, round, prompt), so a rerun of a round forms the same pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxdpo.sampling.prompts import Prompt


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Preference pairs formed from a [P, k] score table: pair j is completion `chosen_index[j]` over
    `rejected_index[j]` of prompt `prompt_index[j]`; `ties` prompts had best == worst and gave no pair, nor
    did the `unscored` prompts, which had fewer than two completions the judge could score."""
    prompt_index: np.ndarray
    chosen_index: np.ndarray
    rejected_index: np.ndarray
    ties: int
    unscored: int = 0


def _pick(candidates: np.ndarray, seed: int, round_index: int, prompt_index: int, stream: int) -> int:
    """One of `candidates`, uniformly, as a pure function of (seed, round, prompt, stream): a resumed or
    re-run round breaks every tie the same way, whatever else ran before."""
    if len(candidates) == 1:
        return int(candidates[0])
    rng = np.random.default_rng([seed, round_index, prompt_index, stream])
    return int(candidates[rng.integers(len(candidates))])


def form_pairs(scores: np.ndarray, *, seed: int, round_index: int) -> Pairs:
    """Best vs worst completion of each prompt by score ([P, k], k >= 2). NaN marks a completion the judge
    could not score (jaxdpo.judging.failures): it takes no part, and a prompt left with fewer than two scored
    completions gives no pair (`unscored`). Prompts whose best and worst scores are equal give no pair and
    are counted in `ties`; where several completions share the best (or the worst) score, one is drawn by
    `_pick`."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"form_pairs: scores must be [prompts, k] with k >= 2 completions each; got {scores.shape}")
    if np.isinf(scores).any():
        bad = int(np.argwhere(np.isinf(scores))[0, 0])
        raise ValueError(f"form_pairs: scores of prompt {bad} are not finite: {scores[bad].tolist()}")
    prompt_index, chosen, rejected, ties = [], [], [], 0
    scored = ~np.isnan(scores)
    for p, row in enumerate(scores):
        if scored[p].sum() < 2:
            continue
        best, worst = np.nanmax(row), np.nanmin(row)
        if best == worst:
            ties += 1
            continue
        prompt_index.append(p)
        chosen.append(_pick(np.flatnonzero(row == best), seed, round_index, p, stream=0))
        rejected.append(_pick(np.flatnonzero(row == worst), seed, round_index, p, stream=1))
    as_array = lambda values: np.asarray(values, np.int64)
    return Pairs(as_array(prompt_index), as_array(chosen), as_array(rejected), ties=ties,
                 unscored=int(np.sum(scored.sum(axis=1) < 2)))


def pair_rows(prompts: Sequence[Prompt], completions: Sequence[Sequence[str]], scores: np.ndarray,
              pairs: Pairs) -> list[dict]:
    """Preference rows (`prompt`, `chosen`, `rejected`, as the data formats read them) with the scores and
    the prompt's index, for training and for the round's audit file."""
    rows = []
    for p, c, r in zip(pairs.prompt_index, pairs.chosen_index, pairs.rejected_index):
        rows.append({"prompt": prompts[p], "chosen": completions[p][c], "rejected": completions[p][r],
                     "chosen_score": float(scores[p][c]), "rejected_score": float(scores[p][r]),
                     "prompt_index": int(p)})
    return rows
