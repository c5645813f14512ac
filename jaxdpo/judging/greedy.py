"""Greedy accuracy: the share of held-out prompts a policy answers right at temperature 0, where "right" is a
judge score of at least `judge.correct_score` (the judge decides what right means; this module only
thresholds it). For jaxdpo.judging.rules:correct_sum a right answer scores 1.0 + 0.1 * brevity and a wrong
one at most 0.1, so judge.correct_score = 1.0.

The win rate compares sampled answers and says whether the policy improved; greedy accuracy says how often
its most likely answer is right, the number a user of a verifiable task asks for.
"""

from __future__ import annotations

import math

import numpy as np

from jaxdpo.errors import ConfigError
from jaxdpo.parallel.distributed import write_jsonl
from jaxdpo.sampling import generate

SETTING = {"correct_score": (None, ("a greedy answer of the held-out prompts is right when its judge score is at "
                                    "least this: eval/greedy_correct per online round; None = not measured"))}


def check_config(config) -> None:
    threshold = config.judge.correct_score
    if threshold is not None and (isinstance(threshold, bool) or not math.isfinite(threshold)):
        raise ConfigError(f"judge.correct_score = {threshold!r} must be a finite number, or None (not measured)")


def is_measured(config) -> bool:
    return config.judge.correct_score is not None


def greedy_settings(sampling_section) -> generate.SamplingSettings:
    """Temperature 0 (argmax) for sampling.max_new_tokens tokens."""
    return generate.SamplingSettings(max_new_tokens=int(sampling_section.max_new_tokens), temperature=0.0)


def share_correct(scores: np.ndarray, correct_score: float) -> float:
    """The share of scores at or above `correct_score`; a NaN score (the judge failed on it) counts as not right."""
    scores = np.asarray(scores, np.float64)
    return float(np.mean(np.nan_to_num(scores, nan=-np.inf) >= correct_score)) if scores.size else float("nan")


def greedy_correct(config, judge, prompts: list, sampler, states, clock, path: str) -> dict[str, float]:
    """eval/greedy_correct of the policy in `states` on `prompts`; each prompt's greedy answer, its judge score
    and whether it is right go to `path` (jsonl). `clock.phase(name)` times the sampling and the judging."""
    with clock.phase("sample"):
        answers = [row["completion"] for row in sampler.complete(states, prompts, greedy_settings(config.sampling))]
    with clock.phase("judge"):
        scores = judge.score(prompts, answers)
    threshold = float(config.judge.correct_score)
    write_jsonl(path, [{"prompt": p, "answer": a, "score": None if np.isnan(s) else float(s),
                        "right": bool(s >= threshold)} for p, a, s in zip(prompts, answers, scores)])
    return {"eval/greedy_correct": share_correct(scores, threshold)}
