"""Read the user's local data files into raw rows, each remembering the file and row it came from.

Supported: .json (a list of objects, or {"data": [...]}), .jsonl/.ndjson, .parquet, .csv, .arrow,
directories written by `datasets.Dataset.save_to_disk`, and plain directories (every supported file
inside, sorted). A spec is a comma-separated list of paths and globs.

Rows that cannot even be read (a JSONL line that is not JSON, bytes that are not UTF-8) are not
fatal here: they come back as `RawRow(error=...)` so that `data.on_bad_row` decides, in one place,
whether they stop the run or are skipped and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
from typing import Any

from jaxdpo.errors import ConfigError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".arrow")


@dataclasses.dataclass
class RawRow:
    """One record of a user file. `row` is 1-based (the line number for JSONL files)."""

    file: str
    row: int
    data: dict[str, Any] | None
    error: str | None = None  # reason the row could not be read: "invalid_json" | "undecodable_text"
    detail: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}, row {self.row}"


def split_spec(spec: str) -> list[str]:
    """'a.jsonl, data/*.parquet' -> ['a.jsonl', 'data/*.parquet'] (empty entries dropped)."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_info.json" in names or "state.json" in names or "dataset_dict.json" in names


def resolve_paths(spec: str) -> list[str]:
    """Expand a comma-separated list of files, globs and directories into a list of paths.

    A `save_to_disk` directory stays one path (it is read as a whole); a plain directory expands to
    its supported files. Raises ConfigError for a path or glob that matches nothing.
    """
    paths: list[str] = []
    for part in split_spec(spec):
        expanded = os.path.expanduser(part)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise ConfigError(f"data file {part!r} does not exist (no file or directory matches it); "
                              "check data.train_files / data.eval_files")
        for match in matches:
            if os.path.isdir(match) and not _is_saved_dataset(match):
                inside = sorted(os.path.join(root, name) for root, _, names in os.walk(match)
                                for name in names if name.endswith(FILE_SUFFIXES))
                if not inside:
                    raise ConfigError(f"directory {match!r} holds no data files ({', '.join(FILE_SUFFIXES)}) "
                                      "and is not a datasets.save_to_disk directory")
                paths.extend(inside)
            else:
                paths.append(match)
    return paths


def _read_jsonl(path: str) -> list[RawRow]:
    rows = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append(RawRow(path, line_number, None, "undecodable_text", f"not UTF-8: {e}"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append(RawRow(path, line_number, None, "invalid_json", str(e)))
                continue
            if not isinstance(value, dict):
                rows.append(RawRow(path, line_number, None, "wrong_type",
                                   f"a line must hold a JSON object, found {type(value).__name__}"))
                continue
            rows.append(RawRow(path, line_number, value))
    return rows


def _read_json(path: str) -> list[RawRow]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        # A whole-file JSON document cannot be read row by row: the file is unusable.
        raise ConfigError(f"{path}: not a valid UTF-8 JSON document ({e}); fix the file, or write one "
                          "object per line as JSONL so that bad rows can be skipped") from e
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: a .json data file must hold a list of objects or {{\"data\": [...]}}, "
                          f"found {type(value).__name__}")
    rows = []
    for index, item in enumerate(value, start=1):
        if isinstance(item, dict):
            rows.append(RawRow(path, index, item))
        else:
            rows.append(RawRow(path, index, None, "wrong_type",
                               f"each entry must be a JSON object, found {type(item).__name__}"))
    return rows


def _message_list(text: str) -> list | None:
    """The JSON list of {"role", "content"} objects a CSV cell holds, or None when it holds something else."""
    if not text.strip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    is_messages = isinstance(value, list) and value and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
    return value if is_messages else None


def _csv_rows(path: str, records: list[dict[str, str]]) -> list[RawRow]:
    """CSV cells are flat strings. A column holds conversations when one of its cells is a JSON list of
    {"role", "content"} objects; those cells are decoded, and a cell there that starts with "[" but is
    not one is a bad row. Anywhere else "[2, 3, 5]" or "{...}" is text."""
    columns = {k for record in records for k, v in record.items() if k is not None and _message_list(v or "")}
    rows = []
    for index, record in enumerate(records, start=1):
        data, problem = {}, None
        for key, value in record.items():
            if key is None:
                continue
            messages = _message_list(value or "") if key in columns else None
            if messages is None and key in columns and (value or "").strip().startswith("[") and problem is None:
                problem = f"column {key!r} holds conversations, but this cell is not a JSON list of messages"
            data[key] = messages if messages is not None else value
        rows.append(RawRow(path, index, None, "wrong_type", problem) if problem else RawRow(path, index, data))
    return rows


def _read_csv(path: str) -> list[RawRow]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the CSV file is not UTF-8 ({e}); re-save it as UTF-8") from e
    return _csv_rows(path, list(csv.DictReader(io.StringIO(text, newline=""))))


def _rows_from_table(path: str, records: list[dict[str, Any]]) -> list[RawRow]:
    return [RawRow(path, index, record) for index, record in enumerate(records, start=1)]


def _read_parquet(path: str) -> list[RawRow]:
    import pyarrow.parquet as pq

    return _rows_from_table(path, pq.read_table(path).to_pylist())


def _read_arrow(path: str) -> list[RawRow]:
    import pyarrow as pa

    # datasets writes Arrow IPC *streams*; other tools write the IPC *file* format. Accept both.
    try:
        with pa.memory_map(path) as source:
            table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:
            table = pa.ipc.open_file(source).read_all()
    return _rows_from_table(path, table.to_pylist())


def _read_saved_dataset(path: str, split: str) -> list[RawRow]:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"{path} is a DatasetDict with splits {sorted(loaded)}; it has no {split!r} "
                              "split. Point data.train_files/eval_files at a split directory instead")
        loaded = loaded[split]
    return _rows_from_table(path, loaded.to_list())


def read_file(path: str, *, split: str = "train") -> list[RawRow]:
    """Raw rows of one file or saved-dataset directory."""
    if os.path.isdir(path):
        return _read_saved_dataset(path, split)
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path)
    if lower.endswith(".json"):
        return _read_json(path)
    if lower.endswith(".parquet"):
        return _read_parquet(path)
    if lower.endswith(".csv"):
        return _read_csv(path)
    if lower.endswith(".arrow"):
        return _read_arrow(path)
    raise ConfigError(f"{path}: unknown data file type; use one of {', '.join(FILE_SUFFIXES)} "
                      "or a datasets.save_to_disk directory")


def load_rows(spec: str, *, split: str = "train") -> list[RawRow]:
    """All raw rows of a comma-separated list of files/globs/directories/hub names, in order."""
    rows: list[RawRow] = []
    for part in split_spec(spec):
        if is_hub_name(part):
            rows.extend(read_hub(part, split=split))
        else:
            for path in resolve_paths(part):
                rows.extend(read_file(path, split=split))
    return rows


# ------------------------------------------------------------------------------------ sources and hub
@dataclasses.dataclass
class Source:
    """One entry of data.train_files: a path/glob/dir or hub name, with its mixing weight if given."""

    spec: str
    weight: float | None = None


def parse_sources(spec: str, *, config_key: str = "data.train_files") -> list[Source]:
    """'a.jsonl@0.7, b.jsonl@0.3' -> [Source('a.jsonl', 0.7), Source('b.jsonl', 0.3)].

    Weights are all given or all absent (absent = concatenate the sources).
    """
    sources = []
    for part in split_spec(spec):
        name, at, weight = part.rpartition("@")
        if not at:
            sources.append(Source(part))
            continue
        try:
            value = float(weight)
        except ValueError:  # an '@' inside a file name, not a weight
            sources.append(Source(part))
            continue
        if not value > 0:
            raise ConfigError(f"{config_key}: the weight of {name!r} is {value}; weights must be > 0")
        sources.append(Source(name.strip(), value))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ConfigError(f"{config_key}: give every entry a weight (a.jsonl@0.7,b.jsonl@0.3) or none; "
                          f"missing on {[s.spec for s in sources if s.weight is None]}")
    if not sources:
        raise ConfigError(f"{config_key} is empty; name at least one data file")
    return sources


_HUB_NAME = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]*){0,2}$")


def is_hub_name(part: str) -> bool:
    """A hub dataset reference: 'hf:owner/name[:subset[:split]]', or the same without 'hf:' when no
    local path of that name exists and it has no data-file suffix."""
    if part.startswith("hf:"):
        return True
    if glob.has_magic(part) or os.path.exists(os.path.expanduser(part)):
        return False
    return bool(_HUB_NAME.match(part)) and not part.lower().endswith(FILE_SUFFIXES) and "/" in part.split(":")[0]


def _offline() -> str | None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def read_hub(part: str, *, split: str = "train") -> list[RawRow]:
    """Rows of a hub dataset 'name[:subset[:split]]' (downloaded by `datasets`, cached by it)."""
    name, _, rest = part.removeprefix("hf:").partition(":")
    subset, _, split_name = rest.partition(":")
    split_name = split_name or split
    offline_var = _offline()
    if offline_var:
        raise ConfigError(f"data source {part!r} is not a local file or directory, and as a hub dataset it needs "
                          f"the network, but {offline_var} is set. Check the path, or download it where there is "
                          f"network (datasets.load_dataset({name!r}, {subset or None!r}, split={split_name!r})"
                          ".save_to_disk(DIR)) and point the config at DIR")
    import datasets

    try:
        loaded = datasets.load_dataset(name, subset or None, split=split_name)
    except Exception as e:  # not found, no network, unknown subset/split: all are the user's to fix
        raise ConfigError(f"could not load hub dataset {name!r} (subset {subset or None!r}, split {split_name!r}): "
                          f"{type(e).__name__}: {e}") from e
    return _rows_from_table(hub_label(part, split=split), loaded.to_list())


def hub_label(part: str, *, split: str = "train") -> str:
    """How rows of a hub source name their file: 'hf:name[:subset]:split'."""
    name, _, rest = part.removeprefix("hf:").partition(":")
    subset, _, split_name = rest.partition(":")
    return f"hf:{name}" + (f":{subset}" if subset else "") + f":{split_name or split}"
