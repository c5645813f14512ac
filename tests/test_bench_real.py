"""tools/bench_real.py's counts: TRL's FLOPs per pair are the formula written out for what it feeds (two causal
rows of prompt + completion, the LM head on every token), and jaxdpo's count of the same pair fed as one
prefix-shared row is smaller by the prompt's second pass and the head on prompt tokens. Speed is not tested."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench_real  # noqa: E402

from jaxdpo.models import ModelConfig  # noqa: E402
from jaxdpo.training import flops  # noqa: E402

CONFIG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=4)


def test_two_row_flops_are_the_formula_written_out():
    prompt, chosen, rejected = 5, 3, 2
    projections = 2 * 2 * (8 * 2 * 4 * 2 + 8 * 1 * 4 * 2 + 3 * 8 * 16)  # 2 layers: q, o; k, v; gate, up, down
    head = 2 * 8 * 100
    per_visible_pair = 4 * 2 * 4 * 2  # QK^T and PV, both heads, both layers
    expected = sum((projections + head) * n + per_visible_pair * n * (n + 1) // 2
                   for n in (prompt + chosen, prompt + rejected))
    assert bench_real.two_row_forward_flops(CONFIG, [(prompt, chosen, rejected)]) == expected


def test_prefix_shared_counts_less_than_two_rows():
    prompt, chosen, rejected = 6, 3, 2
    t = prompt + chosen + rejected
    segment_ids = np.ones((1, t), np.int32)
    branch_ids = np.array([[0] * prompt + [1] * chosen + [2] * rejected], np.int32)
    side = np.array([[0] * (prompt - 1) + [1] * chosen + [0] + [2] * (rejected - 1)], np.int32)
    batch = {"segment_ids": segment_ids, "branch_ids": branch_ids, "positions": np.arange(t)[None], "side": side,
             "scored_index": np.zeros((1, 1), np.int32)}
    shared = flops.forward_flops(CONFIG, batch)["forward"]
    assert shared < bench_real.two_row_forward_flops(CONFIG, [(prompt, chosen, rejected)])


def test_jaxdpo_side_splits_its_batch_as_the_shipped_smollm2_config():
    # The real-model bench measures jaxdpo as configs/smollm2.py trains: 8 pairs a step in micro-batches of 2.
    from argparse import Namespace

    from configs import smollm2

    args = Namespace(model="m", dtype="float32", param_dtype="", chunk=256, remat="none", lora_rank=16, lora_alpha=16.0,
                     max_length=512, max_prompt_length=384, layouts="prefix_shared", batch_size=8, micro_batch_size=0,
                     warmup=1, steps=2, reference="cached")
    shipped = smollm2.get_config().train.micro_batch_size
    assert shipped < args.batch_size
    assert bench_real.jaxdpo_config(args, "train.jsonl", "work").train.micro_batch_size == shipped
    args.micro_batch_size = 8
    assert bench_real.jaxdpo_config(args, "train.jsonl", "work").train.micro_batch_size == 8
    args.batch_size, args.micro_batch_size = 1, 0
    assert bench_real.jaxdpo_config(args, "train.jsonl", "work").train.micro_batch_size == 1
