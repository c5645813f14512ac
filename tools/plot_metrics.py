"""Plot a run's metrics: WORKDIR/metrics.jsonl -> WORKDIR/metrics.png.

    python tools/plot_metrics.py WORKDIR [--out PATH]

One panel per question a DPO run answers: is the loss going down (train and eval), does the policy
prefer the chosen answer (accuracy), where do the rewards go (chosen and rejected: both falling is
common and worth seeing), how wide is the margin, what was the learning rate, were gradients sane.
A panel with nothing to show says so instead of disappearing, so a missing metric is noticed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on headless hosts and never opens a window
import matplotlib.pyplot as plt  # noqa: E402

# (title, y label, metric keys drawn in it). Train lines are solid, eval lines dashed with markers.
PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("loss", "loss", ("train/loss", "eval/loss")),
    ("preference accuracy", "fraction of pairs", ("train/rewards/accuracies", "eval/rewards/accuracies")),
    ("rewards: chosen and rejected", "beta * log-ratio",
     ("train/rewards/chosen", "train/rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected")),
    ("reward margin", "beta * (chosen - rejected)", ("train/rewards/margins", "eval/rewards/margins")),
    ("learning rate", "lr", ("train/lr",)),
    ("gradient norm", "global L2 norm", ("train/grad_norm",)),
]
# Panels of metrics only some runs log, drawn when the run has them. A judge configured: the policy
# against the reference on held-out prompts (ties a half), its 95% interval as a band, 0.5 = no better.
OPTIONAL_PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("judged win rate vs reference", "win rate", ("eval/win_rate",)),
    ("on-policy rounds: mean judge score", "judge score", ("online/score_mean",)),
]


def panels_of(records: list[dict[str, float]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """PANELS, then each optional panel whose metrics the run logged."""
    logged = {key for record in records for key in record}
    return PANELS + [panel for panel in OPTIONAL_PANELS if logged & set(panel[2])]


def _as_float(value, where: str, key: str) -> float:
    # The metrics logger writes non-finite values as the strings "nan", "inf", "-inf".
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key!r} is {value!r}, not a number") from None


def read_records(path: str) -> list[dict[str, float]]:
    """Records of a metrics.jsonl, each {"step": int, key: float}; errors name the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass the run's workdir (the folder holding metrics.jsonl)")
    with open(path) as f:
        lines = f.readlines()
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            if line_no == len(lines) and not line.endswith("\n"):
                break  # the half-written last line of a run still going: plot what is complete
            raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(raw, dict) or "step" not in raw:
            raise ValueError(f"{where}: each record must be a JSON object with a 'step' key, got {line.strip()[:80]}")
        records.append({key: _as_float(value, where, key) for key, value in raw.items()})
    return records


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step, skipping records without it and non-finite values."""
    points = sorted((r["step"], r[key]) for r in records if key in r and math.isfinite(r[key]))
    return [s for s, _ in points], [v for _, v in points]


def plot(records: list[dict[str, float]], out_path: str, title: str = "") -> list[str]:
    """Draw every panel of `panels_of(records)` into `out_path` (PNG); returns the panel titles as drawn, in
    order (a panel without data is titled "<title> (no data)" and names the metrics it looked for)."""
    panels = panels_of(records)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    titles = []
    for ax, (panel_title, ylabel, keys) in zip(axes.flat, panels):
        drawn = 0
        for key in keys:
            steps, values = series(records, key)
            if not steps:
                continue
            is_eval = key.startswith("eval/")
            ax.plot(steps, values, label=key, color=_color(key), linestyle="--" if is_eval else "-",
                    marker="o" if is_eval or len(steps) == 1 else None, markersize=3)
            _interval_band(ax, records, key)
            drawn += 1
        ax.set_title(panel_title if drawn else f"{panel_title} (no data)")
        titles.append(ax.get_title())
        if drawn == 0:
            ax.text(0.5, 0.5, "no data for\n" + "\n".join(keys), ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if panel_title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if panel_title == "gradient norm" and _spans_decades(series(records, "train/grad_norm")[1]):
            ax.set_yscale("log")  # one spike must not flatten the rest of the curve
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return titles


def _interval_band(ax, records, key: str) -> None:
    """The 95% interval of a metric logged with `<key>_low` / `<key>_high` (the win rate), as a band."""
    low_steps, low = series(records, f"{key}_low")
    high_steps, high = series(records, f"{key}_high")
    if low_steps and low_steps == high_steps:
        ax.fill_between(low_steps, low, high, color=_color(key), alpha=0.2, label="95% interval")
        ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")


def _color(key: str) -> str:
    """Chosen green, rejected red (train and eval alike, told apart by line style); else train blue, eval orange."""
    if key.endswith("/chosen"):
        return "tab:green"
    if key.endswith("/rejected"):
        return "tab:red"
    return "tab:orange" if key.startswith("eval/") else "tab:blue"


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 100


def plot_metrics(workdir: str, out: str | None = None) -> list[str]:
    """WORKDIR/metrics.jsonl -> `out` (default WORKDIR/metrics.png); returns the panel titles."""
    records = read_records(os.path.join(workdir, "metrics.jsonl"))
    if not records:
        raise ValueError(f"{os.path.join(workdir, 'metrics.jsonl')} has no records yet: nothing to plot")
    return plot(records, out or os.path.join(workdir, "metrics.png"), title=os.path.basename(os.path.abspath(workdir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the run's workdir, holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output PNG (default WORKDIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        plot_metrics(args.workdir, args.out)
    except (OSError, ValueError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(args.out or os.path.join(args.workdir, "metrics.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
