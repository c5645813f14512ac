"""The function judge kind: `judge.function = "module:function"`, a Python function
`function(prompt, completion) -> float` (verifiable rewards: a format, a length, an answer checker).

It gets each prompt as the data holds it: a string, or a message list for conversational prompts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from jaxdpo.errors import ConfigError
from jaxdpo.judging import failures
from jaxdpo.sampling.prompts import Prompt


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
    """A judge from a Python function `function(prompt, completion) -> float`, imported once; also its own
    judge kind (jaxdpo.judging.judges.KINDS)."""

    selector = "function"
    # key -> (default, what it means): configs/dpo.py's judge section comes from these
    settings = {"function": ("", "'module:function(prompt, completion) -> float', e.g. "
                                 "'jaxdpo.judging.rules:short_answer'")}
    keys = tuple(settings)
    usage = "judge.function ('module:function')"

    def __init__(self, spec: str):
        self.name = spec
        self.function = load_function(spec)

    @classmethod
    def check_config(cls, config) -> None:
        """Imports the function, so a missing module or name fails before anything is built."""
        load_function(config.judge.function)

    @classmethod
    def from_config(cls, config, mesh) -> FunctionJudge:
        del mesh  # runs on the host
        return cls(config.judge.function)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        """[N] float64; NaN for a sample whose call raised (jaxdpo.judging.failures: one line, skipped)."""
        return failures.score_each(self.name, prompts, completions,
                                   lambda i, p, c: failures.checked_score(self.name, self.function(p, c), i))
