"""The win rate of the policy against the reference under a judge, with its 95% Wilson score interval."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

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
    unscored: int = 0  # prompts left out: the judge could not score one side (jaxdpo.judging.failures)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        metrics = {f"{prefix}win_rate": self.win_rate, f"{prefix}win_rate_low": self.low,
                   f"{prefix}win_rate_high": self.high, f"{prefix}judge_score_policy": self.policy_score,
                   f"{prefix}judge_score_reference": self.reference_score}
        return metrics | ({f"{prefix}judge_unscored": self.unscored} if self.unscored else {})


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
    variance at most p (1 - p), the Bernoulli variance Wilson assumes, so with ties it is conservative.
    A prompt where either side's score is NaN (the judge failed on it) is left out and counted in `unscored`."""
    policy, reference = np.asarray(policy_scores, np.float64), np.asarray(reference_scores, np.float64)
    if policy.shape != reference.shape or policy.ndim != 1:
        raise ValueError(f"win_rate: need [N] scores for both sides; got {policy.shape} and {reference.shape}")
    scored = ~(np.isnan(policy) | np.isnan(reference))  # NaN: a sample the judge could not score
    unscored = int(np.sum(~scored))
    policy, reference = policy[scored], reference[scored]
    wins, ties = int(np.sum(policy > reference)), int(np.sum(policy == reference))
    n = len(policy)
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(rate, n) if n else (float("nan"), float("nan"))
    return WinRate(win_rate=rate, low=low, high=high,
                   policy_score=float(policy.mean()) if n else float("nan"),
                   reference_score=float(reference.mean()) if n else float("nan"),
                   wins=wins, ties=ties, losses=n - wins - ties, n=n, unscored=unscored)
