"""Rule judges: verifiable rewards as plain functions `function(prompt, completion) -> float`, for
`judge.function = "jaxdpo.judging.rules:<name>"`.

`correct_sum` checks the content of an answer: for prompts that ask for a sum (the addition data of
configs/smollm2.py and configs/online_addition.py: "a + b", "a plus b", "the sum of a and b", "add a and b"),
the answer must be that sum. The number an answer gives is the first integer that directly follows an
answer word ("=", "is", "equals", "equal to", "results in"; a "$" or "**" between them is allowed) and does
not start an expression ("The answer is 27 + 82 = 109" gives 109, not 27); without one, the last integer.
So "59 + 63 = 122. That's 3 more than 119" gives 122, "The sum of 37 and 45 is 82." gives 82, and
"To add 7 and 5, which results in 12, ..." gives 12. First rather than last: an answer that states a sum
and then rambles on ("82 is 2 more than 80") is judged by the sum it stated.

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
# The operands a prompt asks to add: "a + b" / "a plus b", or "sum of a and b" / "add a and b".
_SUM = re.compile(r"(-?\d+)\s*(?:\+|\bplus\b)\s*(-?\d+)"
                  r"|\b(?:sum of|add|total of)\s+(-?\d+)\s+and\s+(-?\d+)", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d+")
# An answer word, then an integer that is not the first operand of an expression ("is 27 + 82 = ..").
_ANSWER_INTEGER = re.compile(r"(?:=|\bis\b|\bequals\b|\bequal to\b|\bresults in\b)[\s$*]*(-?\d+)\b"
                             r"(?!\s*[-+*/x\u00d7]\s*\d)", re.IGNORECASE)


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
    """1.0 when the completion's answer (see the module docstring) is the sum that the prompt asks for,
    else 0.0; plus a tenth of `short_answer`, so that among right (or among wrong) answers the shorter one
    wins and a round still forms pairs. Correctness always outranks length: 1.0 + 0.1 * brevity > 0.1 >= a
    wrong answer. A prompt that asks for no sum is a config error (this judge is for other data)."""
    return float(answer_number(completion) == sum(asked_operands(prompt))) + 0.1 * short_answer(prompt, completion)


def asked_operands(prompt) -> tuple[int, int]:
    """The two numbers the prompt asks to add (its first "a + b", "a plus b", "sum of a and b", "add a and b")."""
    asked = _SUM.search(prompt_text(prompt))
    if asked is None:
        raise ConfigError(f"judge correct_sum: the prompt {prompt_text(prompt)[:80]!r} asks for no sum "
                          f"('a + b', 'a plus b', 'the sum of a and b', 'add a and b'); use it with addition "
                          f"prompts such as assets/online_addition")
    a, b = (int(x) for x in asked.groups() if x is not None)
    return a, b


def answer_number(completion: str) -> int | None:
    """The integer an arithmetic answer gives: the first after an answer word, else the last one."""
    stated = _ANSWER_INTEGER.search(completion)
    if stated:
        return int(stated.group(1))
    integers = _INTEGER.findall(completion)
    return int(integers[-1]) if integers else None
