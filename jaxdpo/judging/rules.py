"""Rule judges: verifiable rewards as plain functions `function(prompt, completion) -> float`, for
`judge.function = "jaxdpo.judging.rules:<name>"`.

`correct_sum` checks the content of an answer: for prompts that ask for a sum "a + b" (the addition data
of configs/smollm2.py, assets/smollm2), the answer must be that sum: the first integer after the first
"=" ("59 + 63 = 122. That's 3 more than 119" answers 122), else the last integer.

`short_answer` is the judge of the on-policy demo (configs/online_smollm2.py): it rewards answers of at
most MAX_WORDS words, a behaviour the prompts do not ask for and SmolLM2-135M-Instruct rarely shows at the
start (its base rate is in DEVELOPING.md, Measurements), and one a small model can learn by LoRA DPO in a
few rounds: shortening an answer moves few tokens' probabilities (an earlier EOS), the easiest direction
for DPO. Its graded part (MAX_WORDS / words above the limit) ranks long answers too, so a round forms pairs
even before any sample is short. Keep max_new_tokens above ~1.5 tokens per word x MAX_WORDS (64 or more) so
that an answer within the limit is one that ended, not one cut off.
"""

from __future__ import annotations

import re

from jaxdpo.errors import ConfigError

MAX_WORDS = 40
_SUM = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")
_EQUALS_INTEGER = re.compile(r"=\s*(-?\d+)")


def word_count(text: str) -> int:
    return len(text.split())


def short_answer(prompt, completion: str) -> float:
    """1.0 for a non-empty answer of at most MAX_WORDS words; above that MAX_WORDS / words (so among long
    answers the shorter one wins, which gives a pair even when no sample is short yet); 0.0 for an empty
    answer. Two answers within the limit tie: the judge asks for brevity, not for the shortest text, so a
    policy is never pushed toward one-word non-answers."""
    words = word_count(completion)
    if words == 0:
        return 0.0
    return 1.0 if words <= MAX_WORDS else MAX_WORDS / words


def prompt_text(prompt) -> str:
    """The text a judge reads from a prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def correct_sum(prompt, completion: str) -> float:
    """1.0 when the completion's answer (see the module docstring) is the sum a + b that the prompt asks
    for, else 0.0; plus a tenth of `short_answer`, so that among right (or among wrong) answers the shorter
    one wins and a round still forms pairs. Correctness always outranks length: 1.0 + 0.1 * brevity > 0.1 >= a wrong
    answer. A prompt without "a + b" is a config error (this judge is for other data)."""
    asked = _SUM.search(prompt_text(prompt))
    if asked is None:
        raise ConfigError(f"judge correct_sum: the prompt {prompt_text(prompt)[:80]!r} asks for no sum "
                          f"'a + b'; use it with addition prompts such as assets/smollm2")
    right = _answer(completion) == int(asked.group(1)) + int(asked.group(2))
    return float(right) + 0.1 * short_answer(prompt, completion)


def _answer(completion: str) -> int | None:
    """The integer an arithmetic answer gives: the first after the first "=", else the last one."""
    if "=" in completion:
        after = _EQUALS_INTEGER.search(completion[completion.index("="):])
        return int(after.group(1)) if after else None
    integers = _INTEGER.findall(completion)
    return int(integers[-1]) if integers else None
