"""Samples a judge could not score.

A judge that raises for one sample (a rule function that trips over an odd completion, a prompt the reward
model's chat template refuses) costs that sample, not the run: the judge's score for it is NaN (a judge
never returns NaN otherwise: a score that is not a finite number is a one-line ConfigError), one line names
the prompt, the judge and the exception's message, and the pairs, win rates and round reports count it.
A ConfigError raised by the judge is about the run's setup (a judge meant for other data) and stops the run.
Only when every sample of a round fails does the run stop (`require_scored`, exit status 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxdpo.errors import ConfigError
from jaxdpo.parallel import distributed
from jaxdpo.sampling.prompts import Prompt

PROMPT_CHARS = 80  # of a prompt, in the one-line message


def prompt_excerpt(prompt: Prompt) -> str:
    """The prompt as a message shows it: its text (a message list: the last message's), cut to PROMPT_CHARS."""
    text = prompt if isinstance(prompt, str) else (prompt[-1].get("content", "") if prompt else "")
    text = str(text)
    return repr(text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS] + "...")


def skipped_line(judge_name: str, prompt: Prompt, error: Exception) -> str:
    message = " ".join(str(error).split()) or "(no message)"
    return (f"judge {judge_name} failed on prompt {prompt_excerpt(prompt)}: {type(error).__name__}: {message}; "
            f"the sample is skipped")


def each_or_skipped(judge_name: str, prompts: Sequence[Prompt], completions: Sequence[str],
                    work: Callable[[int, Prompt, str], object]) -> list:
    """`work(index, prompt, completion)` of each sample, None (and one line, process 0) where it raised
    anything but a ConfigError."""
    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    results = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            results.append(work(i, prompt, completion))
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - any fault of the judge's code skips this sample alone
            if distributed.is_main_process():
                print(skipped_line(judge_name, prompt, error), flush=True)
            results.append(None)
    return results


def score_each(judge_name: str, prompts: Sequence[Prompt], completions: Sequence[str],
               score_one: Callable[[int, Prompt, str], float]) -> np.ndarray:
    """[N] float64: `score_one(index, prompt, completion)` of each sample, NaN where it raised."""
    scores = each_or_skipped(judge_name, prompts, completions, score_one)
    return np.asarray([np.nan if s is None else s for s in scores], np.float64)


def checked_score(judge_name: str, value, index: int) -> float:
    """`value` as a float; ConfigError (one line) when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ConfigError(f"judge {judge_name} returned {value!r} for completion {index}; it must return a "
                          f"finite number")
    return float(value)


def failed(scores: np.ndarray) -> np.ndarray:
    """Which samples the judge could not score."""
    return np.isnan(np.asarray(scores, np.float64))


def require_scored(scores: np.ndarray, judge_name: str, what: str) -> None:
    """ConfigError (exit status 2) when the judge scored none of `what`'s samples."""
    if len(scores) and failed(scores).all():
        raise ConfigError(f"judge {judge_name} failed on every one of the {len(scores)} samples of {what} (each "
                          f"failure is on a line above); fix the judge or its inputs, then rerun")
