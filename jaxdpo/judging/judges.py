"""The judge protocol and the registry of judge kinds.

A judge scores (prompt, completion) pairs: on-policy rounds turn the scores into preference pairs
(`jaxdpo.judging.pairs`), evaluation into a win rate of the policy against the reference
(`jaxdpo.judging.win_rate`).

A judge kind is one class in `KINDS`: it names the `judge.*` key whose non-empty value selects it
(`selector`), lists every `judge.*` key it reads (`keys`), checks them (`check_config`) and builds its judge
(`from_config`). `judge_kind` is the only place that tells the kinds apart; the config checks, the win rate
during training and the online rounds ask this module rather than reading judge keys themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import ml_collections
import numpy as np

from jaxdpo.errors import ConfigError
from jaxdpo.judging import greedy
from jaxdpo.judging.function_judge import FunctionJudge
from jaxdpo.judging.reward_model_judge import RewardModelJudge
from jaxdpo.sampling.prompts import Prompt


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        """[N] float64, one score per (prompt, completion); higher is better."""


class JudgeKind(Protocol):
    """What the registry asks of a kind; the kinds are classes, so these are class attributes and methods."""

    selector: str  # the judge.* key whose non-empty value selects this kind
    settings: dict[str, tuple]  # every judge.* key the kind reads, the selector first: (default, doc)
    keys: tuple[str, ...]  # tuple(settings)
    usage: str  # how to select it, for messages: "judge.function ('module:function')"

    def check_config(self, config) -> None:
        """ConfigError in one line for a bad value of one of `keys`."""

    def from_config(self, config, mesh) -> Judge:
        """The judge the config describes, placed on `mesh` where it runs on devices."""


KINDS: tuple[type[JudgeKind], ...] = (FunctionJudge, RewardModelJudge)
# The keys that say which judge a run has: recorded with the online rounds, so a rerun with another judge
# does not mix two judges' pairs.
SELECTOR_KEYS = tuple(f"judge.{kind.selector}" for kind in KINDS)


# Keys every kind shares: key -> (default, doc).
SHARED_SETTINGS = {"prompts": (32, "held-out prompts judged for the win rate (the first distinct ones)"),
                   **greedy.SETTING}


def config_defaults() -> dict:
    """configs/dpo.py's judge section: the shared keys and every kind's (selectors empty: no judge)."""
    settings = dict(SHARED_SETTINGS)
    for kind in KINDS:
        settings.update(kind.settings)
    # a None default takes no value from flags unless its reference says the type it may hold
    return {key: default for key, (default, _) in settings.items()} | {
        "correct_score": ml_collections.FieldReference(None, field_type=float)}


def judge_kind(config) -> type[JudgeKind] | None:
    """The kind whose selector key is set, None when none is; ConfigError when several are."""
    chosen = [kind for kind in KINDS if config.judge[kind.selector]]
    if len(chosen) > 1:
        settings = " and ".join(f"judge.{kind.selector} = {config.judge[kind.selector]!r}" for kind in chosen)
        raise ConfigError(f"{settings} are {'both' if len(chosen) == 2 else 'all'} set; set exactly one of them")
    return chosen[0] if chosen else None


def is_configured(config) -> bool:
    return judge_kind(config) is not None


def usage() -> str:
    """How to set a judge, for the messages of features that need one."""
    return " or ".join(kind.usage for kind in KINDS)


def check_config(config) -> None:
    """The `judge` section: at most one kind selected, its keys valid, judge.prompts positive."""
    prompts = config.judge.prompts
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ConfigError(f"judge.prompts = {prompts!r} must be positive")
    greedy.check_config(config)
    kind = judge_kind(config)
    if kind is not None:
        kind.check_config(config)


def make_judge(config, mesh) -> Judge | None:
    """The run's judge, on `mesh` where it runs on devices; None when no kind is selected."""
    kind = judge_kind(config)
    return None if kind is None else kind.from_config(config, mesh)


def clear_judge(config) -> None:
    """Unset every selector key in place: `config` then describes a run without a judge."""
    for kind in KINDS:
        config.judge[kind.selector] = ""
