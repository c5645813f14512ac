"""Prompts as the data holds them (a string, or a list of {"role", "content"} messages), for sampling.

Samples during training, the win rate and on-policy rounds draw completions for prompts; a judge is given
each prompt exactly as its file holds it. Prompt files use the sources and formats of `data.*`
(jaxdpo/data/loading.py): a row with `data.prompt_key` gives that prompt (prompt-only rows are fine), a
preference row without one gives its implicit prompt (the shared start of chosen and rejected).
"""

from __future__ import annotations

import json

from jaxdpo.data.formats import BadRow, normalize_row, text_or_messages
from jaxdpo.data.loading import RawRow, load_rows, parse_sources
from jaxdpo.errors import ConfigError

Prompt = str | list[dict]


def prompt_of(row: RawRow, data_cfg) -> Prompt:
    """The prompt of one raw row; ConfigError naming the file and row when it has none."""
    if row.error is not None:
        raise ConfigError(f"bad prompt row ({row.where}): {row.error}: {row.detail}")
    try:
        if data_cfg.prompt_key in row.data and row.data[data_cfg.prompt_key] is not None:
            return text_or_messages(row.data, data_cfg.prompt_key)
        return normalize_row(row.data, prompt_key=data_cfg.prompt_key, chosen_key=data_cfg.chosen_key,
                             rejected_key=data_cfg.rejected_key).prompt
    except BadRow as e:
        raise ConfigError(f"bad prompt row ({row.where}): no {data_cfg.prompt_key!r} and no preference pair to "
                          f"take an implicit prompt from ({e.detail})") from None


def read_prompts(spec: str, data_cfg, *, config_key: str, distinct: bool = False) -> list[Prompt]:
    """Every prompt of a comma-separated list of files/globs/dirs/hub names, in order (`distinct`: each
    prompt once, at its first row)."""
    if not spec:
        raise ConfigError(f"{config_key} is empty; name a file of prompts (JSONL rows with {data_cfg.prompt_key!r})")
    prompts = [prompt_of(row, data_cfg) for row in load_rows(spec, split="train")]
    if distinct:
        prompts = first_distinct(prompts, len(prompts))
    if not prompts:
        raise ConfigError(f"{config_key} = {spec!r} holds no prompts")
    return prompts


def first_distinct(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first `n` distinct prompts, in order."""
    seen, out = set(), []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
        if len(out) == n:
            break
    return out


def heldout_prompts(config, eval_sources: list[tuple[str, int]], n: int) -> list[Prompt]:
    """The first `n` distinct prompts of a run's eval pairs (`Data.eval_pairs.source`: (file, row) of each
    pair, in eval order), read from data.eval_files, or from data.train_files for a held-out fraction."""
    spec = config.data.eval_files or config.data.train_files
    wanted = set(eval_sources)
    by_source = {}
    for source in parse_sources(spec, config_key="data.eval_files" if config.data.eval_files else "data.train_files"):
        for row in load_rows(source.spec, split="test" if config.data.eval_files else "train"):
            if (row.file, row.row) in wanted:
                by_source[(row.file, row.row)] = row
    rows = [by_source[source] for source in eval_sources if source in by_source]
    return first_distinct([prompt_of(row, config.data) for row in rows], n)
