"""Write the prompts of the on-policy arithmetic demo (configs/online_addition.py): two-digit additions
a + b in several phrasings, as chat prompts. The held-out eval prompts share no pair of numbers {a, b}
(in either order) with the train prompts, so a policy that gets them right has learned to add, not
remembered sums.

    python tools/make_addition_prompts.py assets/online_addition   # -> prompts.jsonl, eval_prompts.jsonl

Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys

# Every phrasing jaxdpo.judging.rules:correct_sum reads the operands of.
PHRASINGS = ("What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.", "What's the sum of {a} and {b}?",
             "Calculate {a} + {b}.", "What is {a} plus {b}?", "Find the sum of {a} and {b}.", "{a} + {b} = ?")
TRAIN_PROMPTS = 1024
EVAL_PROMPTS = 128
SEED = 0


def number_pairs(rng: random.Random) -> list[tuple[int, int]]:
    """Every unordered pair {a, b} of two-digit numbers (a <= b), in a seeded order."""
    pairs = list(itertools.combinations_with_replacement(range(10, 100), 2))
    rng.shuffle(pairs)
    return pairs


def prompt_row(pair: tuple[int, int], rng: random.Random) -> dict:
    """A chat prompt asking for the sum of the pair, in a drawn phrasing and order."""
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return {"prompt": [{"role": "user", "content": rng.choice(PHRASINGS).format(a=a, b=b)}]}


def split_prompts(seed: int = SEED, train: int = TRAIN_PROMPTS, held_out: int = EVAL_PROMPTS):
    """(train rows, eval rows): disjoint sets of number pairs, each pair asked once."""
    rng = random.Random(seed)
    pairs = number_pairs(rng)
    eval_pairs, train_pairs = pairs[:held_out], pairs[held_out:held_out + train]
    return [prompt_row(p, rng) for p in train_pairs], [prompt_row(p, rng) for p in eval_pairs]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    train_rows, eval_rows = split_prompts()
    write_jsonl(os.path.join(out_dir, "prompts.jsonl"), train_rows)
    write_jsonl(os.path.join(out_dir, "eval_prompts.jsonl"), eval_rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "assets/online_addition")
