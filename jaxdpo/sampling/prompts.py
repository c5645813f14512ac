"""Prompts as the data holds them (a string, or a list of {"role", "content"} messages), for sampling.

The one reader of prompt files: `python -m jaxdpo.sample --prompts`, `online.prompts` and
`online.eval_prompts`. A spec is a comma-separated list of files/globs/dirs/hub names, as `data.*`
(jaxdpo/data/loading.py): a row with the prompt key gives that prompt (prompt-only rows are fine), a
preference row without one gives its implicit prompt (the shared start of chosen and rejected). Every line
of a .jsonl file is JSON: a line that does not parse is an error naming its file and line, never a prompt.
A .txt file holds plain text, one prompt a non-blank line. Samples during training, the win rate and
on-policy rounds draw completions for these prompts; a judge is given each prompt exactly as its file holds it.

`PromptRoom` fits a prompt's tokens and the completion into the model's positions: too long a prompt is an
error naming it, or is cut as `data.truncation` cuts training prompts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from jaxdpo.data.formats import BadRow, normalize_row, text_or_messages
from jaxdpo.data.loading import (
    FILE_SUFFIXES,
    RawRow,
    is_hub_name,
    load_rows,
    parse_sources,
    read_file,
    resolve_paths,
    split_spec,
)
from jaxdpo.data.tokenize import cut_prompt
from jaxdpo.errors import ConfigError

Prompt = str | list[dict]
TEXT_SUFFIX = ".txt"
LINE_SUFFIXES = (".jsonl", ".ndjson", TEXT_SUFFIX)  # files whose rows are lines: errors name the line
TRUNCATIONS = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class PromptKeys:
    """Where a row keeps its prompt (or its pair, for an implicit prompt); a run's `data` section has the
    same three attributes."""

    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"


def where(row: RawRow) -> str:
    """'FILE line N' for line-based files, else 'FILE, row N'."""
    return f"{row.file} line {row.row}" if row.file.lower().endswith(LINE_SUFFIXES) else row.where


def prompt_of(row: RawRow, keys) -> Prompt:
    """The prompt of one raw row (`keys`: a PromptKeys or a run's `data` section); ConfigError naming the
    file and row when it has none."""
    if row.error is not None:
        raise ConfigError(f"bad prompt row ({where(row)}): {row.error}: {row.detail}")
    explicit = row.data.get(keys.prompt_key) is not None
    try:
        if explicit:
            return text_or_messages(row.data, keys.prompt_key)
        return normalize_row(row.data, prompt_key=keys.prompt_key, chosen_key=keys.chosen_key,
                             rejected_key=keys.rejected_key).prompt
    except BadRow as e:
        problem = e.detail if explicit else (f"no {keys.prompt_key!r} and no preference pair to take an implicit "
                                             f"prompt from ({e.detail})")
        raise ConfigError(f"bad prompt row ({where(row)}): {problem}") from None


def read_prompts(spec: str, keys, *, config_key: str, distinct: bool = False) -> list[Prompt]:
    """Every prompt of a prompt spec, in order (`distinct`: each prompt once, at its first row); an empty
    prompt is an error."""
    if not spec:
        raise ConfigError(f"{config_key} is empty; name a file of prompts (JSONL rows with {keys.prompt_key!r})")
    prompts = []
    for row in prompt_rows(spec, keys.prompt_key, config_key=config_key):
        prompt = prompt_of(row, keys)
        if not prompt:
            raise ConfigError(f"bad prompt row ({where(row)}): the prompt is empty")
        prompts.append(prompt)
    if distinct:
        prompts = first_distinct(prompts, len(prompts))
    if not prompts:
        raise ConfigError(f"{config_key} = {spec!r} holds no prompts")
    return prompts


def prompt_rows(spec: str, prompt_key: str, *, config_key: str) -> list[RawRow]:
    """The raw rows of a prompt spec: data files as `data.*` reads them, .txt lines as {prompt_key: line}."""
    rows = []
    for part in split_spec(spec):
        if is_hub_name(part) and not _is_text(part):
            rows.extend(load_rows(part, split="train"))
            continue
        for path in local_paths(part, config_key=config_key):
            rows.extend(_text_rows(path, prompt_key) if _is_text(path) else read_file(path, split="train"))
    return rows


def local_paths(part: str, *, config_key: str) -> list[str]:
    """The files one local entry of a prompt spec names; ConfigError when it names none or an unknown type."""
    if not glob.has_magic(part) and not os.path.exists(os.path.expanduser(part)):
        raise ConfigError(f"{config_key}: {part} does not exist")
    paths = resolve_paths(part)
    for path in paths:
        if not os.path.isdir(path) and not path.lower().endswith((*FILE_SUFFIXES, TEXT_SUFFIX)):
            raise ConfigError(f"{config_key}: {path}: unknown prompt file type; use {TEXT_SUFFIX} (one plain-text "
                              f"prompt a line) or a data file ({', '.join(FILE_SUFFIXES)})")
    return paths


def _is_text(path: str) -> bool:
    return path.lower().endswith(TEXT_SUFFIX)


def _text_rows(path: str, prompt_key: str) -> list[RawRow]:
    """Each non-blank line of a text file is one prompt, exactly as written (JSON in it is text)."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                rows.append(RawRow(path, number, None, "undecodable_text", f"not UTF-8: {e}"))
                continue
            if line.strip():
                rows.append(RawRow(path, number, {prompt_key: line}))
    return rows


def check_output_path(output: str, spec: str, *, config_key: str, output_key: str) -> None:
    """ConfigError when `output` is one of the spec's prompt files (writing it would destroy them)."""
    if not os.path.exists(output):
        return
    for part in split_spec(spec):
        if is_hub_name(part) and not _is_text(part):
            continue
        for path in local_paths(part, config_key=config_key):
            if os.path.samefile(path, output):
                raise ConfigError(f"{output_key} = {output} is the prompts file {path} ({config_key}); write the "
                                  f"completions to another file")


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


# ---- prompt tokens in the model's positions -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptRoom:
    """A prompt's tokens plus max_new_tokens must fit the model's `positions`. Too long a prompt is cut as
    `truncation` says (keep_end | keep_start, as data.truncation), or with None is an error naming it."""

    positions: int
    truncation: str | None = None

    def __post_init__(self):
        if self.truncation is not None and self.truncation not in TRUNCATIONS:
            raise ConfigError(f"prompt truncation {self.truncation!r} is not one of {', '.join(TRUNCATIONS)}")

    def fit(self, prompt_ids: list[list[int]], max_new_tokens: int, bos_id: int | None) -> list[list[int]]:
        """Each prompt's ids, cut where needed to leave max_new_tokens positions for the completion."""
        limit = self.positions - max_new_tokens
        if limit < 1:
            raise ConfigError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in the model's "
                              f"{self.positions} positions")
        too_long = next((i for i, ids in enumerate(prompt_ids) if len(ids) > limit), None)
        if too_long is not None and self.truncation is None:
            n = len(prompt_ids[too_long])
            raise ConfigError(f"prompt {too_long} has {n} tokens; with max_new_tokens = {max_new_tokens} that is "
                              f"{n + max_new_tokens} > the model's {self.positions} positions: shorten it, or let "
                              f"prompts be cut (--truncate_prompt=keep_end|keep_start)")
        return [cut_prompt(ids, limit, self.truncation, bos_id) if len(ids) > limit else ids for ids in prompt_ids]
