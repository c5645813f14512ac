"""tools/bench.py end to end on a tiny Qwen2-shaped model: every figure the closing notes quote is produced,
and the counted ones (tokens, FLOPs, parameters) equal the counts written out here from the synthetic pairs.
How fast anything ran is not asserted: tools/bench.py measures speed, tests check behaviour."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench  # noqa: E402

BATCH, STEPS, PROMPT_LEN, COMPLETION_LEN = 8, 2, 20, 10
FIGURES = {"layout", "row_length", "params", "compile_s", "compiled_shapes", "step_s", "step_times_s",
           "pairs_per_s", "tokens_per_s", "fed_tokens_per_step", "flops_per_pair", "achieved_flops_per_s",
           "compiled_memory_bytes", "peak_device_memory_bytes", "last_loss", "reference_build_s", "mfu"}


def pair_lengths() -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of each benchmarked pair: one token per word, EOS ends a completion
    (no pair is near --max-length, so nothing is truncated)."""
    rows = bench.synthetic_rows(STEPS * BATCH, bench.SHAPES["qwen2-tiny"]["vocab"], PROMPT_LEN, COMPLETION_LEN,
                                jitter=0.6, seed=0)
    return [(len(r["prompt"].split()), len(r["chosen"].split()) + 1, len(r["rejected"].split()) + 1) for r in rows]


def fed_rows(layout: str, n: int, c: int, r: int) -> list[tuple[int, list[int]]]:
    """What `layout` feeds the model for one pair: (tokens before the branches, [tokens of each branch]).
    padded: two causal rows, prompt+chosen and prompt+rejected; packed (prefix-shared pairs): the prompt
    but its last token once, then two branches (that last token and a completion) that see it, not each other."""
    return [(n + c, []), (n + r, [])] if layout == "padded" else [(n - 1, [c + 1, r + 1])]


def forward_flops(layout: str, n: int, c: int, r: int) -> int:
    """One pair's forward on qwen2-tiny (hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, vocabulary
    1000, tied head): projections on every token fed, the LM head on each completion token, QK^T and PV on
    every (query, key) pair the mask lets through."""
    projections = 2 * (64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128)  # q, o; k, v; gate, up, down
    tokens = sum(shared + sum(branches) for shared, branches in fed_rows(layout, n, c, r))
    visible = sum(shared * (shared + 1) // 2 + sum(b * shared + b * (b + 1) // 2 for b in branches)
                  for shared, branches in fed_rows(layout, n, c, r))
    return 2 * projections * tokens + 2 * 64 * 1000 * (c + r) + 2 * (4 * 4 * 16) * visible


def test_bench_reports_every_figure_for_two_layouts(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--shape", "qwen2-tiny", "--warmup", "0", "--steps", str(STEPS), "--batch-size",
                         str(BATCH), "--layouts", "padded,packed", "--max-length", "64", "--max-prompt-length", "48",
                         "--prompt-len", str(PROMPT_LEN), "--completion-len", str(COMPLETION_LEN),
                         "--json", str(out)])
    assert json.loads(out.read_text())["jaxdpo"].keys() == {"padded", "packed"}
    assert report["peak_source"] == "measured fp32 matmul"

    lengths = pair_lengths()
    tokens_per_pair = sum(n + c + r for n, c, r in lengths) / len(lengths)
    for layout, r in report["jaxdpo"].items():
        assert r.keys() == FIGURES | ({"speedup_vs_padded"} if layout != "padded" else set())
        assert r["layout"] == layout and len(r["step_times_s"]) == STEPS
        assert r["params"] == report["hf_params"]
        # the timed steps are one epoch, every pair once; the reference model runs in the step (reference.mode
        # device): a policy forward and backward (3 forwards) and a reference forward
        fed = [sum(shared + sum(branches) for shared, branches in fed_rows(layout, *pair)) for pair in lengths]
        assert r["fed_tokens_per_step"] == sum(fed) / STEPS
        flops = [4 * forward_flops(layout, *pair) for pair in lengths]
        assert r["flops_per_pair"] == pytest.approx(sum(flops) / len(lengths), rel=1e-12)
        # the figures derived from the step time are the counts over that time
        assert r["pairs_per_s"] == BATCH / r["step_s"]
        assert r["tokens_per_s"] / r["pairs_per_s"] == pytest.approx(tokens_per_pair, rel=1e-12)
        assert r["achieved_flops_per_s"] == r["flops_per_pair"] * r["pairs_per_s"]
        assert r["mfu"] == r["achieved_flops_per_s"] / report["peak_flops_per_s"]
        assert r["compiled_memory_bytes"] > 0
    packed, padded = report["jaxdpo"]["packed"], report["jaxdpo"]["padded"]
    assert packed["speedup_vs_padded"] == packed["pairs_per_s"] / padded["pairs_per_s"]


def test_qlora_memory_per_base_dtype(tmp_path):
    """--base-dtypes on fsdp 2: the quantized projections' bytes per device are the codes plus their float32 scales
    (the acceptance bounds 0.27x and 0.15x of fp32), every param's bytes equal tools/memory_report.py's count
    from config.json alone, and the compiled step's arguments are exactly the described state, frozen base and
    batch: the analysis is of the step that holds the quantized base."""
    from jaxdpo.models.hf_io import load_config
    from jaxdpo.parallel.sharding import make_mesh
    from tools.memory_report import base_bytes_per_device

    report = bench.main(["--base-dtypes", "none,int8,nf4", "--shape", "llama-tiny-head64", "--batch-size", "2",
                         "--max-length", "16", "--max-prompt-length", "8", "--fsdp", "2", "--json", str(tmp_path / "q.json")])
    qlora = report["qlora"]
    rows = {r["base_dtype"]: r for r in qlora["rows"]}
    assert rows.keys() == {"none", "int8", "nf4"}
    fp32 = rows["none"]["projection_bytes"]
    assert rows["int8"]["projections_vs_float"] == rows["int8"]["projection_bytes"] / fp32 == (1 + 4 / 64) / 4
    assert rows["nf4"]["projections_vs_float"] == rows["nf4"]["projection_bytes"] / fp32 == (0.5 + 4 / 64) / 4
    assert rows["int8"]["projections_vs_float"] <= 0.27 and rows["nf4"]["projections_vs_float"] <= 0.15

    mesh = make_mesh(1, 2, 1, jax.devices()[:2])
    expected = base_bytes_per_device(load_config(qlora["model"]), mesh, rank=16)
    for name, r in rows.items():
        assert (r["projection_bytes"], r["param_bytes"]) == (expected[name]["projections"], expected[name]["params"])
        assert r["reference"] == "lora_base" and (r["micro_batches"], r["rows"]) == (1, 2)
        memory = r["memory_analysis"]
        assert memory["argument_size_in_bytes"] == r["state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]
        assert memory["output_size_in_bytes"] >= r["state_bytes"] > 0 and memory["temp_size_in_bytes"] > 0
        assert r["compiled_bytes"] == (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                       - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])
    # the adapters and their optimizer state do not depend on how the base is stored
    assert rows["none"]["state_bytes"] == rows["int8"]["state_bytes"] == rows["nf4"]["state_bytes"]
