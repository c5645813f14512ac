"""Preference data: user files -> normalized pairs -> token ids -> layout-independent batches.

    train, eval, report = load_preference_data(cfg.data, tokenizer, workdir=cfg.workdir, seed=cfg.seed)
    T = row_length(train, cfg.data.layout, cfg.data)
    batcher = PairBatcher(train, layout=cfg.data.layout, row_length=T, batch_size=..., ...)
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from jaxdpo.config import ConfigError
from jaxdpo.data.batcher import PairBatcher
from jaxdpo.data.formats import BadRow, Pair, normalize_row
from jaxdpo.data.layouts import LAYOUTS, make_batch, row_length
from jaxdpo.data.loading import RawRow, load_rows
from jaxdpo.data.tokenize import TokenizedPairs, TokenizerSpec, make_spec, tokenize_pair, truncate

__all__ = ["load_preference_data", "tokenize_rows", "TokenizedPairs", "PairBatcher", "make_batch", "row_length",
           "LAYOUTS", "format_report"]


def _bad(row: RawRow, reason: str, key: str | None, detail: str, on_bad_row: str, dropped: collections.Counter):
    if on_bad_row == "error":
        where = f"{row.where}" + (f", key {key!r}" if key else "")
        raise ConfigError(f"bad data row ({where}): {reason}: {detail}. Fix the row, or set "
                          "data.on_bad_row=skip to skip and count such rows")
    dropped[reason] += 1


def tokenize_rows(rows: list[RawRow], data_cfg, spec: TokenizerSpec) -> tuple[TokenizedPairs, dict]:
    """Normalize, tokenize and truncate raw rows; -> pairs and their report section."""
    on_bad_row = data_cfg.on_bad_row
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row={on_bad_row!r}; use error or skip")
    pairs = TokenizedPairs.empty()
    dropped: collections.Counter = collections.Counter()
    prefix_mismatch = 0
    for row in rows:
        if row.error is not None:
            _bad(row, row.error, None, row.detail, on_bad_row, dropped)
            continue
        try:
            pair: Pair = normalize_row(row.data, prompt_key=data_cfg.prompt_key, chosen_key=data_cfg.chosen_key,
                                       rejected_key=data_cfg.rejected_key)
            prompt, chosen, rejected, mismatches = tokenize_pair(spec, pair)
        except BadRow as e:
            _bad(row, e.reason, e.key, e.detail, on_bad_row, dropped)
            continue
        prefix_mismatch += mismatches
        truncated = truncate(prompt, chosen, rejected, max_length=int(data_cfg.max_length),
                             max_prompt_length=int(data_cfg.max_prompt_length), truncation=data_cfg.truncation,
                             bos_id=spec.bos_id)
        if truncated is None:
            dropped["truncated_to_empty"] += 1  # a length setting, not a bad row: always counted, never fatal
            continue
        pairs.append(*truncated, (row.file, row.row))
    section = {"rows": len(rows), "kept": len(pairs), "dropped": dict(sorted(dropped.items())),
               "prefix_mismatch": prefix_mismatch}
    return pairs, section


def _split_fraction(pairs: TokenizedPairs, fraction: float, seed: int) -> tuple[TokenizedPairs, TokenizedPairs]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={fraction} must be in (0, 1) when data.eval_files is empty")
    n_eval = max(1, int(round(fraction * len(pairs))))
    if n_eval >= len(pairs):
        raise ConfigError(f"data.eval_fraction={fraction} of {len(pairs)} pairs leaves nothing to train on")
    # A fixed seed-derived choice, independent of the training shuffle, so the eval set never changes.
    held_out = np.sort(np.random.default_rng([seed, 0xE7A1]).permutation(len(pairs))[:n_eval])
    is_eval = np.zeros(len(pairs), bool)
    is_eval[held_out] = True
    return pairs.subset(np.flatnonzero(~is_eval)), pairs.subset(held_out)


def format_report(report: dict) -> str:
    """A short table: split, rows read, pairs kept, and drops by reason."""
    lines = [f"{'split':<6} {'rows':>7} {'kept':>7}  dropped / notes"]
    for split in ("train", "eval"):
        section = report.get(split)
        if not section:
            continue
        notes = [f"{reason}={count}" for reason, count in section["dropped"].items()]
        if section.get("prefix_mismatch"):
            notes.append(f"prefix_mismatch={section['prefix_mismatch']}")
        lines.append(f"{split:<6} {section['rows']:>7} {section['kept']:>7}  {', '.join(notes) or '-'}")
    return "\n".join(lines)


def load_preference_data(data_cfg, tokenizer, *, workdir: str | None = None, seed: int = 0):
    """-> (train: TokenizedPairs, eval: TokenizedPairs | None, report: dict).

    Raises ConfigError (before anything is compiled) for missing files, bad rows under
    data.on_bad_row=error, and data left empty after filtering.
    """
    spec = make_spec(tokenizer, data_cfg.get("chat_template", ""))
    train_rows = load_rows(data_cfg.train_files, split="train")
    if data_cfg.get("max_samples", 0):
        train_rows = train_rows[:int(data_cfg.max_samples)]
    train, train_section = tokenize_rows(train_rows, data_cfg, spec)
    report = {"train": train_section}
    if len(train) == 0:
        raise ConfigError(f"no training pairs left from {data_cfg.train_files!r} "
                          f"(dropped: {train_section['dropped']}); check the keys and length settings")
    eval_pairs = None
    if data_cfg.get("eval_files", ""):
        eval_pairs, report["eval"] = tokenize_rows(load_rows(data_cfg.eval_files, split="test"), data_cfg, spec)
    elif data_cfg.get("eval_fraction", 0.0):
        train, eval_pairs = _split_fraction(train, float(data_cfg.eval_fraction), seed)
        report["eval"] = {"rows": len(eval_pairs), "kept": len(eval_pairs), "dropped": {}, "prefix_mismatch": 0,
                          "held_out_from_train": True}
        report["train"] = dict(train_section, kept=len(train))
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "data_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return train, eval_pairs, report
