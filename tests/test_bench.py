"""tools/bench.py end to end on a tiny Qwen2-shaped model: every figure the closing notes quote is produced."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench  # noqa: E402


def test_bench_reports_every_figure_for_two_layouts(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--shape", "qwen2-tiny", "--steps", "1", "--batch-size", "8", "--layouts", "padded,packed",
                         "--max-length", "64", "--max-prompt-length", "48", "--prompt-len", "20",
                         "--completion-len", "10", "--json", str(out)])
    assert json.loads(out.read_text())["jaxdpo"].keys() == {"padded", "packed"}
    assert report["peak_source"] == "measured fp32 matmul" and report["peak_flops_per_s"] > 0
    for layout, r in report["jaxdpo"].items():
        assert r["compile_s"] > 0 and r["step_s"] > 0 and r["pairs_per_s"] == 8 / r["step_s"]
        assert r["tokens_per_s"] > 0 and r["flops_per_pair"] > 0 and 0 < r["mfu"] < 1
        assert r["compiled_memory_bytes"] > 0
    # the same pairs: one pair's tokens are counted the same whatever the layout
    per_pair = {k: r["tokens_per_s"] / r["pairs_per_s"] for k, r in report["jaxdpo"].items()}
    assert per_pair["packed"] == pytest.approx(per_pair["padded"], rel=1e-9)
    assert report["jaxdpo"]["packed"]["speedup_vs_padded"] > 0
