"""Rule judges: verifiable rewards as plain functions `function(prompt, completion) -> float`, for
`judge.function = "jaxdpo.judges_rules:<name>"`.

`short_answer` is the judge of the on-policy demo (configs/online_smollm2.py): it rewards answers of at
most MAX_WORDS words, a behaviour the prompts do not ask for and SmolLM2-135M-Instruct shows in under a
third of its samples at the start (see BASE_RATE_NOTE), and one a small model can learn by LoRA DPO in a
few rounds: shortening an answer changes few tokens' probabilities (an earlier EOS), the easiest
direction for DPO to move.
"""

from __future__ import annotations

MAX_WORDS = 20


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
