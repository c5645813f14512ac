"""Preference data: user files -> normalized examples -> token ids -> layout-independent batches.

    train, eval, report = load_preference_data(cfg.data, tokenizer, workdir=cfg.workdir, seed=cfg.seed)
    T = row_length(train, cfg.data.layout, cfg.data)
    batcher = PairBatcher(train, layout=cfg.data.layout, row_length=T, batch_size=..., ...)

Examples are pairs (TokenizedPairs) or, for an unpaired loss (`kind=ExampleKind.UNPAIRED`), unpaired
rows (TokenizedRows): a paired file then gives each pair's chosen and rejected completion as a desirable
and an undesirable row, in TRL's order (formats.unpair_order). With loss.group set (`kind=GROUP`) they are
groups of N scored completions (TokenizedGroups); a pair is then the group (chosen, rejected), scores (1, 0). jaxdpo/data/examples.py says what an
example is to the batcher.

Each entry of data.train_files is a source (files/globs/dir or a hub name), tokenized on its own and
cached on its own; entries with weights ("a.jsonl@0.7,b.jsonl@0.3") are mixed in those proportions.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from jaxdpo.data import cache, identity
from jaxdpo.data.batcher import PairBatcher
from jaxdpo.data.examples import ExampleKind, UnpairedExamples
from jaxdpo.data.formats import (
    BadRow,
    Pair,
    check_prompt_key,
    files_with_margins,
    is_group_row,
    is_unpaired_row,
    normalize_group_row,
    normalize_row,
    pair_as_group,
    normalize_unpaired_row,
    pair_margin,
    unpair,
    unpair_order,
)
from jaxdpo.data.layouts import LAYOUTS, make_batch, row_length
from jaxdpo.data.loading import (
    RawRow,
    Source,
    hub_label,
    is_hub_name,
    load_rows,
    parse_sources,
    resolve_paths,
)
from jaxdpo.data.tokenize import (
    TokenizedGroups,
    TokenizedPairs,
    TokenizedRows,
    TokenizerSpec,
    make_spec,
    tokenize_completions,
    tokenize_pair,
    truncate,
    truncate_group,
    truncate_row,
)
from jaxdpo.errors import ConfigError

__all__ = ["load_preference_data", "tokenize_rows", "tokenize_unpaired_rows", "mix_sources", "format_report",
           "TokenizedPairs", "TokenizedRows", "TokenizedGroups", "ExampleKind", "UnpairedExamples", "PairBatcher",
           "make_batch", "row_length", "LAYOUTS", "require_full_batch"]


def _bad(row: RawRow, reason: str, key: str | None, detail: str, on_bad_row: str, dropped: collections.Counter):
    if on_bad_row == "error":
        where = f"{row.where}" + (f", key {key!r}" if key else "")
        raise ConfigError(f"bad data row ({where}): {reason}: {detail}. Fix the row, or set "
                          "data.on_bad_row=skip to skip and count such rows")
    dropped[reason] += 1


def _with_progress(items, progress: bool, label: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"tokenizing {label}", unit="row", leave=False, mininterval=1.0)


def _section(rows: list[RawRow], kept, dropped: collections.Counter, prefix_mismatch: int) -> dict:
    """A source's report section: rows read, examples kept, why the others were dropped."""
    return {"rows": len(rows), "kept": len(kept), "dropped": dict(sorted(dropped.items())),
            "prefix_mismatch": prefix_mismatch}


def _check_on_bad_row(data_cfg) -> str:
    if data_cfg.on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row={data_cfg.on_bad_row!r}; use error or skip")
    return data_cfg.on_bad_row


def row_shapes(rows: list[RawRow], data_cfg) -> list[bool]:
    """Whether each row is unpaired (None-data rows count as their file's shape). ConfigError naming the
    file and both rows when a file mixes pairs and unpaired rows: one of its shapes is a mistake."""
    keys = dict(completion_key=data_cfg.get("completion_key", "completion"), chosen_key=data_cfg.chosen_key,
                rejected_key=data_cfg.rejected_key)
    first: dict[str, tuple[int, bool]] = {}
    shapes = []
    for row in rows:
        unpaired = row.data is not None and is_unpaired_row(row.data, **keys)
        if row.data is not None:
            row_number, shape = first.setdefault(row.file, (row.row, unpaired))
            if shape != unpaired:
                kinds = {True: f"unpaired ({keys['completion_key']!r})", False: "a pair"}
                raise ConfigError(f"{row.file} mixes pairs and unpaired rows: row {row.row} is {kinds[unpaired]}, "
                                  f"row {row_number} is {kinds[shape]}; keep one shape per file")
        shapes.append(unpaired)
    return shapes


def _refuse_unpaired(rows: list[RawRow], shapes: list[bool], data_cfg) -> None:
    for row, unpaired in zip(rows, shapes):
        if unpaired:
            raise ConfigError(f"{row.where} is an unpaired row (key {data_cfg.get('completion_key', 'completion')!r}), "
                              "but loss.types takes pairs (chosen, rejected); use an unpaired loss (kto, "
                              "apo_zero_unpaired) or paired data")


def tokenize_rows(rows: list[RawRow], data_cfg, spec: TokenizerSpec, *, progress: bool = False,
                  label: str = "") -> tuple[TokenizedPairs, dict]:
    """Normalize, tokenize and truncate raw rows; -> pairs (with their margins) and their report section."""
    on_bad_row = _check_on_bad_row(data_cfg)
    _refuse_unpaired(rows, row_shapes(rows, data_cfg), data_cfg)
    with_margins = files_with_margins(rows)
    pairs = TokenizedPairs.empty()
    dropped: collections.Counter = collections.Counter()
    prefix_mismatch = 0
    rows = _with_progress(rows, progress, label)
    for row in rows:
        if row.error is not None:
            _bad(row, row.error, None, row.detail, on_bad_row, dropped)
            continue
        try:
            pair: Pair = normalize_row(row.data, prompt_key=data_cfg.prompt_key, chosen_key=data_cfg.chosen_key,
                                       rejected_key=data_cfg.rejected_key)
            margin = pair_margin(row.data, has_column=row.file in with_margins)
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
        pairs.append(*truncated, (row.file, row.row), margin)
    return pairs, _section(rows, pairs, dropped, prefix_mismatch)


def _normalized_unpaired(rows: list[RawRow], shapes: list[bool], data_cfg, on_bad_row: str,
                         dropped: collections.Counter) -> list[tuple]:
    """(LabelledCompletion, raw row) of every good row, pairs unpaired in TRL's order per run of
    consecutive pairs (so a paired file gives what unpair_preference_dataset gives)."""
    out, run = [], []

    def flush():
        out.extend((unpair(run[i][0], desirable), run[i][1]) for i, desirable in unpair_order(len(run)))
        run.clear()

    for row, unpaired in zip(rows, shapes):
        if row.error is not None:
            _bad(row, row.error, None, row.detail, on_bad_row, dropped)
            continue
        try:
            if unpaired:
                flush()
                out.append((normalize_unpaired_row(row.data, prompt_key=data_cfg.prompt_key,
                                                   completion_key=data_cfg.completion_key,
                                                   label_key=data_cfg.label_key), row))
            else:
                run.append((normalize_row(row.data, prompt_key=data_cfg.prompt_key, chosen_key=data_cfg.chosen_key,
                                          rejected_key=data_cfg.rejected_key), row))
        except BadRow as e:
            _bad(row, e.reason, e.key, e.detail, on_bad_row, dropped)
    flush()
    return out


def tokenize_unpaired_rows(rows: list[RawRow], data_cfg, spec: TokenizerSpec, *, progress: bool = False,
                           label: str = "") -> tuple[TokenizedRows, dict]:
    """Normalize (unpairing pairs), tokenize and truncate raw rows; -> unpaired rows and their report section.
    Each row is tokenized alone, with TRL's rule for one completion (tokenize.tokenize_standard)."""
    on_bad_row = _check_on_bad_row(data_cfg)
    dropped: collections.Counter = collections.Counter()
    normalized = _normalized_unpaired(rows, row_shapes(rows, data_cfg), data_cfg, on_bad_row, dropped)
    normalized = _with_progress(normalized, progress, label)
    out, prefix_mismatch = TokenizedRows.empty(), 0
    for item, row in normalized:
        try:
            prompt, (completion,), mismatches = tokenize_completions(
                spec, item.prompt, (item.completion,), conversational=item.conversational,
                keys=(data_cfg.completion_key,))
        except BadRow as e:
            _bad(row, e.reason, e.key, e.detail, on_bad_row, dropped)
            continue
        prefix_mismatch += mismatches
        truncated = truncate_row(prompt, completion, max_length=int(data_cfg.max_length),
                                 max_prompt_length=int(data_cfg.max_prompt_length), truncation=data_cfg.truncation,
                                 bos_id=spec.bos_id)
        if truncated is None:
            dropped["truncated_to_empty"] += 1
            continue
        out.append(*truncated, item.label, (row.file, row.row))
    return out, _section(rows, out, dropped, prefix_mismatch)


def _normalized_group(row: RawRow, data_cfg):
    """A group row as it is, a pair as the group (chosen, rejected); an unpaired row is refused."""
    if is_group_row(row.data, completions_key=data_cfg.completions_key):
        return normalize_group_row(row.data, prompt_key=data_cfg.prompt_key, completions_key=data_cfg.completions_key,
                                   scores_key=data_cfg.scores_key)
    if is_unpaired_row(row.data, completion_key=data_cfg.completion_key, chosen_key=data_cfg.chosen_key,
                       rejected_key=data_cfg.rejected_key):
        raise ConfigError(f"{row.where} is an unpaired row (key {data_cfg.completion_key!r}), but loss.group "
                          f"takes groups ({data_cfg.completions_key!r}, {data_cfg.scores_key!r}) or pairs")
    return pair_as_group(normalize_row(row.data, prompt_key=data_cfg.prompt_key, chosen_key=data_cfg.chosen_key,
                                       rejected_key=data_cfg.rejected_key))


def tokenize_group_rows(rows: list[RawRow], data_cfg, spec: TokenizerSpec, *, progress: bool = False,
                        label: str = "") -> tuple[TokenizedGroups, dict]:
    """Normalize, tokenize and truncate raw rows into groups (pairs become groups of two); -> groups and
    their report section. A bad group (fewer than 2 completions, scores that are not one finite number per
    completion) is one error naming file, row and key, or skipped and counted (data.on_bad_row)."""
    on_bad_row = _check_on_bad_row(data_cfg)
    out, dropped, prefix_mismatch = TokenizedGroups.empty(), collections.Counter(), 0
    rows = _with_progress(rows, progress, label)
    for row in rows:
        if row.error is not None:
            _bad(row, row.error, None, row.detail, on_bad_row, dropped)
            continue
        try:
            group = _normalized_group(row, data_cfg)
            prompt, completions, mismatches = tokenize_completions(
                spec, group.prompt, group.completions, conversational=group.conversational,
                keys=(data_cfg.completions_key,) * len(group.completions))
        except BadRow as e:
            _bad(row, e.reason, e.key, e.detail, on_bad_row, dropped)
            continue
        prefix_mismatch += mismatches
        truncated = truncate_group(prompt, completions, max_length=int(data_cfg.max_length),
                                   max_prompt_length=int(data_cfg.max_prompt_length), truncation=data_cfg.truncation,
                                   bos_id=spec.bos_id)
        if truncated is None:
            dropped["truncated_to_empty"] += 1
            continue
        out.append(*truncated, group.scores, (row.file, row.row))
    return out, _section(rows, out, dropped, prefix_mismatch)


TOKENIZE = {ExampleKind.PAIR: tokenize_rows, ExampleKind.UNPAIRED: tokenize_unpaired_rows,
            ExampleKind.GROUP: tokenize_group_rows}


def _source_identity(source: Source, split: str) -> tuple[list[str], dict, list]:
    """-> (the file names its rows carry, its identity for the report, its part of the cache key).

    Local files are known by content: their sha256, hashed here on every run. A hub dataset is known
    by its name (`datasets` caches the download itself)."""
    if is_hub_name(source.spec):
        import datasets

        return [hub_label(source.spec, split=split)], {"hub": source.spec}, ["hub", source.spec, datasets.__version__]
    paths = resolve_paths(source.spec)
    files = identity.files_identity(paths)
    return paths, {"files": files}, [f["sha256"] for f in files]


def load_source(source: Source, data_cfg, spec: TokenizerSpec, *, split: str, log,
                kind: ExampleKind = ExampleKind.PAIR) -> tuple[TokenizedPairs | TokenizedRows, dict]:
    """Tokenized examples of one source, from the cache when the same contents were tokenized before.

    The section it returns carries the source's identity ("files": path and sha256 of each, or "hub")."""
    max_samples = int(data_cfg.get("max_samples", 0) or 0) if split == "train" else 0
    files, ident, key_parts = _source_identity(source, split)
    entry = None
    if data_cfg.get("use_cache", True):
        key = cache.cache_key(key_parts, spec, data_cfg, split, kind)
        entry = os.path.join(cache.default_cache_dir(data_cfg.get("cache_dir", "")), "tokenized", f"{key}.npz")
        cached = cache.load(entry, files, kind, on_damage=(lambda m: log(f"data: tokenized-data {m}")) if log else None)
        if cached is not None:
            pairs, section = cached
            return pairs, dict(section, source=source.spec, cached=True, **ident)
    rows = load_rows(source.spec, split=split)
    if max_samples:
        rows = rows[:max_samples]  # tokenize no more than can be used
    check_prompt_key(rows, data_cfg.prompt_key)
    pairs, section = TOKENIZE[kind](rows, data_cfg, spec, progress=log is not None, label=source.spec)
    if entry is not None:
        try:
            cache.save(entry, pairs, section, files)
        except OSError as e:  # a read-only or full cache dir must not stop training
            if log is not None:
                log(f"data: could not write the tokenized-data cache {entry}: {e}")
    return pairs, dict(section, source=source.spec, cached=False, **ident)


def mix_sources(parts: list, weights: list[float], total: int, seed: int):
    """`total` examples (pairs or unpaired rows) drawn from the parts in proportion to `weights` (normalized).

    A part asked for more pairs than it has is repeated whole, then topped up with a seeded random
    subset; one asked for fewer gives a seeded random subset. Deterministic in `seed`.
    """
    share = np.asarray(weights, np.float64) / np.sum(weights)
    counts = np.floor(share * total).astype(int)
    # Largest remainders get the leftover pairs, so the counts sum to `total` exactly.
    for i in np.argsort(-(share * total - counts), kind="stable")[:total - counts.sum()]:
        counts[i] += 1
    chosen = []
    for i, (part, need) in enumerate(zip(parts, counts)):
        if need and not len(part):
            raise ConfigError(f"data source {i} has no pairs left but has mixing weight {weights[i]}")
        repeats, rest = divmod(int(need), max(len(part), 1))
        rng = np.random.default_rng([seed, 0x313C, i])
        picks = np.concatenate([np.arange(len(part))] * repeats + [np.sort(rng.permutation(len(part))[:rest])])
        chosen.append(part.subset(picks.astype(int)))
    return type(parts[0]).concat(chosen)


def require_full_batch(batcher: PairBatcher) -> None:
    """ConfigError (one line, naming the key and the files) when the training pairs do not fill one batch:
    checked while building the data, before anything is compiled or evaluated."""
    if batcher.num_pairs >= batcher.batch_size:
        return
    files = sorted({f for f, _ in batcher.pairs.source})
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise ConfigError(f"train.batch_size={batcher.batch_size} is more than the {batcher.num_pairs} "
                      f"{batcher.pairs.kind.noun} of the "
                      f"training data ({named or 'no files'}); lower train.batch_size or add data")


def _split_fraction(pairs: TokenizedPairs, fraction: float, seed: int, salt: int = 0):
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={fraction} must be in (0, 1) when data.eval_files is empty")
    n_eval = max(1, int(round(fraction * len(pairs))))
    if n_eval >= len(pairs):
        raise ConfigError(f"data.eval_fraction={fraction} of {len(pairs)} pairs leaves nothing to train on")
    # A fixed seed-derived choice, independent of the training shuffle, so the eval set never changes.
    held_out = np.sort(np.random.default_rng([seed, 0xE7A1, salt]).permutation(len(pairs))[:n_eval])
    is_eval = np.zeros(len(pairs), bool)
    is_eval[held_out] = True
    return pairs.subset(np.flatnonzero(~is_eval)), pairs.subset(held_out)


def _totals(sections: list[dict]) -> dict:
    dropped: collections.Counter = collections.Counter()
    for s in sections:
        dropped.update(s["dropped"])
    return {"rows": sum(s["rows"] for s in sections), "kept": sum(s["kept"] for s in sections),
            "dropped": dict(sorted(dropped.items())), "prefix_mismatch": sum(s["prefix_mismatch"] for s in sections),
            "sources": sections}


def format_report(report: dict) -> str:
    """A short table: per split and source, rows read, examples kept, drops by reason; then examples used."""
    lines = [f"{'split':<6} {'source':<40} {'rows':>8} {'kept':>8}  dropped / notes"]
    for split in ("train", "eval"):
        section = report.get(split)
        if not section:
            continue
        for s in section.get("sources", []):
            notes = [f"{reason}={count}" for reason, count in s["dropped"].items()]
            if s.get("prefix_mismatch"):
                notes.append(f"prefix_mismatch={s['prefix_mismatch']}")
            if s.get("cached"):
                notes.append("cached")
            if s.get("weight") is not None:
                notes.append(f"weight={s['weight']}")
            name = s["source"] if len(s["source"]) <= 40 else "..." + s["source"][-37:]
            lines.append(f"{split:<6} {name:<40} {s['rows']:>8} {s['kept']:>8}  {', '.join(notes) or '-'}")
        how = " (held out from train)" if section.get("held_out_from_train") else ""
        used = f"= {section['examples_are']} used" + how
        lines.append(f"{split:<6} {used:<40} {'':>8} {section['examples']:>8}")
    return "\n".join(lines)


def check_data_config(data_cfg) -> None:
    """The `data` section's cross-key rules and its local files (hub names are checked when read)."""
    if data_cfg.max_prompt_length >= data_cfg.max_length:
        raise ConfigError(f"data.max_prompt_length = {data_cfg.max_prompt_length} leaves no room for the "
                          f"completion in data.max_length = {data_cfg.max_length}; make it smaller (or 0 for no "
                          f"prompt limit)")
    if data_cfg.pack_length and data_cfg.layout != "packed":
        raise ConfigError(f"data.pack_length = {data_cfg.pack_length} only applies to data.layout = 'packed' "
                          f"(layout is {data_cfg.layout!r}); set it to 0 or use the packed layout")
    if data_cfg.eval_files and data_cfg.eval_fraction:
        raise ConfigError(f"data.eval_files and data.eval_fraction = {data_cfg.eval_fraction} are both set; "
                          "use eval files or a held-out fraction of the training data, not both")
    for key in ("train_files", "eval_files"):
        if key == "eval_files" and not data_cfg.eval_files:
            continue
        for source in parse_sources(data_cfg[key], config_key=f"data.{key}"):
            if not is_hub_name(source.spec):
                try:
                    resolve_paths(source.spec)
                except ConfigError as e:
                    raise ConfigError(f"data.{key}: {e}") from None


def _count(section: dict, examples, kind: ExampleKind) -> dict:
    """The report section with the examples used: `examples` (and `pairs` for pairs) and their kind."""
    section = dict(section, examples=len(examples), examples_are=kind.noun)
    if kind is ExampleKind.PAIR:
        section["pairs"] = len(examples)
    return section


def require_both_labels(rows: TokenizedRows, files_key: str) -> None:
    """ConfigError naming the files when unpaired training rows are all desirable or all undesirable: an
    unpaired loss weighs one class against the other (KTO's balance, its KL reference point)."""
    desirable = sum(rows.labels)
    if 0 < desirable < len(rows):
        return
    missing = "undesirable (label false)" if desirable else "desirable (label true)"
    files = sorted({f for f, _ in rows.source})
    raise ConfigError(f"{files_key} ({', '.join(files[:3])}) has no {missing} row among its {len(rows)} rows; an "
                      "unpaired loss needs both kinds")


def _load_eval_files(eval_spec: str, data_cfg, spec: TokenizerSpec, log, kind: ExampleKind):
    """The examples of data.eval_files and their report section."""
    eval_sources = parse_sources(eval_spec, config_key="data.eval_files")
    if any(s.weight is not None for s in eval_sources):
        raise ConfigError("data.eval_files takes no mixing weights: every eval example is evaluated once")
    parts, sections = zip(*(load_source(s, data_cfg, spec, split="test", log=log, kind=kind) for s in eval_sources))
    examples = type(parts[0]).concat(parts)
    return examples, _count(_totals(list(sections)), examples, kind)


def load_preference_data(data_cfg, tokenizer, *, workdir: str | None = None, seed: int = 0, log=print,
                         kind: ExampleKind = ExampleKind.PAIR):
    """-> (train, eval or None, report): TokenizedPairs, or TokenizedRows for `kind` UNPAIRED.

    Raises ConfigError (before anything is compiled) for missing files, bad rows under
    data.on_bad_row=error, and data left empty after filtering. `log` (None = quiet, e.g. on all
    processes but the first) prints the report table and shows a progress bar while tokenizing;
    `workdir` (None = don't write) receives data_report.json.
    """
    spec = make_spec(tokenizer, data_cfg.get("chat_template", ""))
    sources = parse_sources(data_cfg.train_files, config_key="data.train_files")
    eval_spec = data_cfg.get("eval_files", "")
    fraction = float(data_cfg.get("eval_fraction", 0.0) or 0.0)

    train_parts, eval_parts, sections = [], [], []
    for i, source in enumerate(sources):
        pairs, section = load_source(source, data_cfg, spec, split="train", log=log, kind=kind)
        section["weight"] = source.weight
        sections.append(section)
        if not eval_spec and fraction:
            # Hold out per source, before mixing, so that repeated (upsampled) pairs never land in both.
            pairs, held_out = _split_fraction(pairs, fraction, seed, salt=i)
            eval_parts.append(held_out)
        train_parts.append(pairs)
    report = {"train": _totals(sections)}
    if not sum(len(p) for p in train_parts):
        raise ConfigError(f"no training pairs left from data.train_files={data_cfg.train_files!r} "
                          f"(dropped: {report['train']['dropped']}); check the keys and length settings")

    max_samples = int(data_cfg.get("max_samples", 0) or 0)
    if sources[0].weight is not None:
        total = max_samples or sum(len(p) for p in train_parts)
        train = mix_sources(train_parts, [s.weight for s in sources], total, seed)
    else:
        train = type(train_parts[0]).concat(train_parts)
        if max_samples:
            train = train.subset(range(min(max_samples, len(train))))
    report["train"] = _count(report["train"], train, kind)
    if kind is ExampleKind.UNPAIRED:
        require_both_labels(train, f"data.train_files={data_cfg.train_files!r}")

    eval_pairs = None
    if eval_spec:
        eval_pairs, report["eval"] = _load_eval_files(eval_spec, data_cfg, spec, log, kind)
    elif fraction:
        eval_pairs = type(eval_parts[0]).concat(eval_parts)
        report["eval"] = _count({"rows": len(eval_pairs), "kept": len(eval_pairs), "dropped": {}, "prefix_mismatch": 0,
                                 "sources": [], "held_out_from_train": True}, eval_pairs, kind)

    if log is not None:
        log("data:\n" + format_report(report))
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "data_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return train, eval_pairs, report
