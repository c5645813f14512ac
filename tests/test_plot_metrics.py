"""tools/plot_metrics.py on a synthetic metrics.jsonl shaped like the trainer's."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(REPO_ROOT, "tools", "plot_metrics.py"))
plot_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)

BASE_TITLES = [title for title, _, _ in plot_metrics.PANELS]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(workdir, *, with_lr=True, nan_at=None, partial_tail=False):
    """40 train records (every step) and an eval record every 10 steps, like the trainer writes."""
    os.makedirs(workdir, exist_ok=True)
    lines = [json.dumps({"step": 0, "eval/loss": math.log(2), "eval/rewards/accuracies": 0.0,
                         "eval/rewards/margins": 0.0, "eval/rewards/chosen": 0.0, "eval/rewards/rejected": 0.0})]
    for step in range(1, 41):
        record = {"step": step, "train/loss": math.log(2) * math.exp(-step / 20),
                  "train/rewards/accuracies": min(1.0, step / 30), "train/rewards/chosen": -0.01 * step,
                  "train/rewards/rejected": -0.05 * step, "train/rewards/margins": 0.04 * step,
                  "train/grad_norm": 1.0 / step, "train/pairs_per_s": 100.0}
        if with_lr:
            record["train/lr"] = 1e-6 * min(1.0, step / 5)
        if step == nan_at:
            record["train/loss"] = "nan"  # how jaxdpo.training.metrics writes a non-finite value
        lines.append(json.dumps(record))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "eval/loss": 0.6 - 0.01 * step,
                                     "eval/rewards/accuracies": step / 50, "eval/rewards/margins": 0.03 * step,
                                     "eval/rewards/chosen": -0.02 * step, "eval/rewards/rejected": -0.05 * step}))
    text = "\n".join(lines) + "\n"
    if partial_tail:
        text += '{"step": 41, "train/lo'
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(text)


def test_every_panel_is_drawn_into_a_png(tmp_path):
    _write_run(tmp_path)
    titles = plot_metrics.plot_metrics(str(tmp_path))
    assert titles == BASE_TITLES
    assert titles == ["loss", "preference accuracy", "rewards: chosen and rejected", "reward margin",
                      "learning rate", "gradient norm"]
    png = tmp_path / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_a_judged_run_gets_its_win_rate_panel(tmp_path):
    _write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (0, 20, 40):
            rate = 0.5 + step / 100
            f.write(json.dumps({"step": step, "eval/win_rate": rate, "eval/win_rate_low": rate - 0.15,
                                "eval/win_rate_high": min(1.0, rate + 0.1)}) + "\n")
    titles = plot_metrics.plot_metrics(str(tmp_path))
    assert titles == BASE_TITLES + ["judged win rate vs reference"]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_a_panel_without_data_says_so(tmp_path):
    _write_run(tmp_path, with_lr=False)
    titles = plot_metrics.plot_metrics(str(tmp_path), out=str(tmp_path / "plots" / "m.png"))
    assert len(titles) == len(BASE_TITLES)
    assert titles[BASE_TITLES.index("learning rate")] == "learning rate (no data)"
    assert [t for t in titles if t.endswith("(no data)")] == ["learning rate (no data)"]
    assert (tmp_path / "plots" / "m.png").read_bytes()[:8] == PNG_MAGIC


def test_reading_skips_non_finite_values_and_a_half_written_last_line(tmp_path):
    _write_run(tmp_path, nan_at=7, partial_tail=True)
    records = plot_metrics.read_records(str(tmp_path / "metrics.jsonl"))
    assert len(records) == 1 + 40 + 4
    steps, losses = plot_metrics.series(records, "train/loss")
    assert len(steps) == 39 and 7 not in steps and steps == sorted(steps)
    eval_steps, eval_acc = plot_metrics.series(records, "eval/rewards/accuracies")
    assert eval_steps == [0, 10, 20, 30, 40] and eval_acc == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert plot_metrics.plot_metrics(str(tmp_path)) == BASE_TITLES


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_metrics.plot_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n{"train/loss": 0.4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*'step' key"):
        plot_metrics.plot_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        plot_metrics.plot_metrics(str(tmp_path))


def test_command_line(tmp_path):
    _write_run(tmp_path)
    out = tmp_path / "cli.png"
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_metrics.py"), str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    missing = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_metrics.py"),
                              str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
