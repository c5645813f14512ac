"""Write the chat-format preference set configs/smollm2.py trains on: two-digit additions, where the chosen
answer is short and right ("23 + 48 = 71.") and the rejected one is wrong, either as short or in the
rambling style SmolLM2-135M-Instruct answers such questions with.

    python tools/make_addition_prefs.py assets/smollm2     # -> train.jsonl (256 pairs), eval.jsonl (32)
"""

from __future__ import annotations

import json
import os
import random
import sys

RAMBLING = "To add {a} and {b}, we need to follow the order of operations: {a} + {b} = {wrong}."


def pair(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    wrong = a + b + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
    rejected = RAMBLING if rng.random() < 0.4 else "{a} + {b} = {wrong}."
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
            "rejected": [{"role": "assistant", "content": rejected.format(a=a, b=b, wrong=wrong)}]}


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 288:  # no question twice, so eval questions are unseen in training
        row = pair(rng)
        question = row["prompt"][0]["content"]
        if question not in seen:
            seen.add(question)
            rows.append(row)
    for name, part in (("train", rows[:256]), ("eval", rows[256:])):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "assets/smollm2")
