"""Judges score (prompt, completion) pairs; on-policy DPO turns the scores into preference pairs, and
evaluation into a win rate of the policy against the reference.

A judge is anything with `name` and `score(prompts, completions) -> np.ndarray` ([N] float64):
- `jaxdpo.models.reward_model.RewardModel`: a Hugging Face `*ForSequenceClassification` checkpoint;
- `FunctionJudge`: a Python function given as "module:function", `function(prompt, completion) -> float`
  (verifiable rewards: a format, a length, an answer checker). It gets each prompt as the data holds it: a
  string, or a message list for conversational prompts.
`make_judge` is the one place that picks between them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from jaxdpo.errors import ConfigError

Prompt = str | list[dict]


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        """[N] float64, one score per (prompt, completion); higher is better."""


# ---- function judges ------------------------------------------------------------------------------------

def load_function(spec: str) -> Callable[[Prompt, str], float]:
    """Import "module:function" once; ConfigError (one line) if the module or function is missing. A module
    that exists but fails on import raises its own error: that is a bug in the user's code, not the config."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"judge {spec!r}: expected 'module:function' (e.g. 'jaxdpo.judging.rules:short_answer')")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise  # a module the user's module imports is missing
        raise ConfigError(f"judge {spec!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH "
                          f"(the directory you run from is)?") from None
    if not hasattr(module, function_name):
        raise ConfigError(f"judge {spec!r}: module {module_name!r} ({module.__file__}) has no function "
                          f"{function_name!r}")
    function = getattr(module, function_name)
    if not callable(function):
        raise ConfigError(f"judge {spec!r}: {module_name}.{function_name} is not callable "
                          f"(it is a {type(function).__name__})")
    return function


class FunctionJudge:
    """A judge from a Python function `function(prompt, completion) -> float`, imported once."""

    def __init__(self, spec: str):
        self.name = spec
        self.function = load_function(spec)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        scores = np.zeros(len(completions), np.float64)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            value = self.function(prompt, completion)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ConfigError(f"judge {self.name} returned {value!r} for completion {i}; it must return a "
                                  f"finite number")
            scores[i] = value
        return scores


def make_judge(*, function: str = "", reward_model: str = "", mesh=None, dtype=None, batch_size: int = 8,
               max_length: int | None = None) -> Judge:
    """The configured judge: exactly one of `function` ("module:function") or `reward_model` (an HF
    *ForSequenceClassification dir, loaded on `mesh` in compute `dtype`; default float32)."""
    if bool(function) == bool(reward_model):
        raise ConfigError("judge: set exactly one of judge.function ('module:function') and judge.reward_model "
                          f"(a *ForSequenceClassification checkpoint dir); got function={function!r}, "
                          f"reward_model={reward_model!r}")
    if function:
        return FunctionJudge(function)
    import jax.numpy as jnp

    from jaxdpo.models.reward_model import RewardModel

    return RewardModel(reward_model, dtype=dtype or jnp.float32, mesh=mesh, batch_size=batch_size,
                       max_length=max_length)


# ---- pairs from k scored completions per prompt ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pairs:
    """Preference pairs formed from a [P, k] score table: pair j is completion `chosen_index[j]` over
    `rejected_index[j]` of prompt `prompt_index[j]`; `ties` prompts had best == worst and gave no pair."""
    prompt_index: np.ndarray
    chosen_index: np.ndarray
    rejected_index: np.ndarray
    ties: int


def _pick(candidates: np.ndarray, seed: int, round_index: int, prompt_index: int, stream: int) -> int:
    """One of `candidates`, uniformly, as a pure function of (seed, round, prompt, stream): a resumed or
    re-run round breaks every tie the same way, whatever else ran before."""
    if len(candidates) == 1:
        return int(candidates[0])
    rng = np.random.default_rng([seed, round_index, prompt_index, stream])
    return int(candidates[rng.integers(len(candidates))])


def form_pairs(scores: np.ndarray, *, seed: int, round_index: int) -> Pairs:
    """Best vs worst completion of each prompt by score ([P, k], k >= 2). Prompts whose best and worst
    scores are equal give no pair and are counted in `ties`; where several completions share the best
    (or the worst) score, one is drawn by `_pick`."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"form_pairs: scores must be [prompts, k] with k >= 2 completions each; got {scores.shape}")
    if not np.isfinite(scores).all():
        bad = int(np.argwhere(~np.isfinite(scores))[0, 0])
        raise ValueError(f"form_pairs: scores of prompt {bad} are not finite: {scores[bad].tolist()}")
    prompt_index, chosen, rejected = [], [], []
    for p, row in enumerate(scores):
        best, worst = row.max(), row.min()
        if best == worst:
            continue
        prompt_index.append(p)
        chosen.append(_pick(np.flatnonzero(row == best), seed, round_index, p, stream=0))
        rejected.append(_pick(np.flatnonzero(row == worst), seed, round_index, p, stream=1))
    as_array = lambda values: np.asarray(values, np.int64)
    return Pairs(as_array(prompt_index), as_array(chosen), as_array(rejected), ties=len(scores) - len(prompt_index))


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


# ---- win rate -------------------------------------------------------------------------------------------

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile


@dataclasses.dataclass(frozen=True)
class WinRate:
    win_rate: float
    low: float
    high: float
    policy_score: float
    reference_score: float
    wins: int
    ties: int
    losses: int
    n: int

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}win_rate": self.win_rate, f"{prefix}win_rate_low": self.low,
                f"{prefix}win_rate_high": self.high, f"{prefix}judge_score_policy": self.policy_score,
                f"{prefix}judge_score_reference": self.reference_score}


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a mean `p` of n outcomes in [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(policy_scores: np.ndarray, reference_scores: np.ndarray) -> WinRate:
    """Per prompt: 1 if the policy's completion scores higher than the reference's, 0.5 on a tie, 0 if
    lower; the mean over prompts, with a 95% Wilson score interval, and each side's mean judge score.

    Why Wilson: eval sets are small (tens of prompts) and a trained policy's win rate sits near 1, where
    the normal approximation on the per-prompt scores (mean +- 1.96 s/sqrt(n)) collapses to zero width
    (all wins give s = 0) and can leave [0, 1]. Wilson's interval stays inside [0, 1] and keeps a width
    at 0 and 1. Ties make an outcome 0.5 rather than Bernoulli; an outcome in [0, 1] with mean p has
    variance at most p (1 - p), the Bernoulli variance Wilson assumes, so with ties it is conservative."""
    policy, reference = np.asarray(policy_scores, np.float64), np.asarray(reference_scores, np.float64)
    if policy.shape != reference.shape or policy.ndim != 1:
        raise ValueError(f"win_rate: need [N] scores for both sides; got {policy.shape} and {reference.shape}")
    wins, ties = int(np.sum(policy > reference)), int(np.sum(policy == reference))
    n = len(policy)
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(rate, n) if n else (float("nan"), float("nan"))
    return WinRate(win_rate=rate, low=low, high=high,
                   policy_score=float(policy.mean()) if n else float("nan"),
                   reference_score=float(reference.mean()) if n else float("nan"),
                   wins=wins, ties=ties, losses=n - wins - ties, n=n)
