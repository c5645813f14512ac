"""On-disk cache of tokenized pairs, so that a second run with the same inputs starts at once.

The key is a hash of everything tokenization depends on: the source files' contents (sha256 of their
bytes, identity.py; not their paths, so the same file under another spelling hits the cache), the
tokenizer (its serialized vocabulary/merges, special tokens, chat template), the data keys, lengths,
truncation and bad-row policy, and a format version bumped whenever tokenization code changes its
output. An entry is one .npz (ids concatenated, with lengths) written atomically, so processes of a
multi-process run may all write the same entry safely. An entry that cannot be read whole (truncated,
empty, a bad CRC) is reported in one line and rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import zipfile

import numpy as np

from jaxdpo.data.examples import ExampleKind
from jaxdpo.data.tokenize import TokenizedGroups, TokenizedPairs, TokenizedRows, TokenizerSpec

# Bump when the tokenized output of the same inputs changes (tokenize.py, formats.py, truncation).
CACHE_VERSION = 3  # 3: pairs' entries hold their margins; 2: keys on content digests, rows tokenized as TRL 1.x
# What reading a damaged .npz raises: a zip with no directory or a bad CRC, a short read, bad JSON.
NPZ_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def default_cache_dir(cache_dir: str) -> str:
    return os.path.expanduser(cache_dir or os.path.join("~", ".cache", "jaxdpo"))


def tokenizer_fingerprint(spec: TokenizerSpec) -> str:
    tok = spec.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    parts = [body, repr(getattr(tok, "special_tokens_map", {})), str(getattr(tok, "chat_template", None)),
             str(spec.chat_template), str(spec.adds_bos), str(spec.bos_id), str(spec.eos_id)]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


# The data keys only one kind of example reads (pairs' keys are read by every kind).
_KIND_KEYS = {ExampleKind.UNPAIRED: ("completion_key", "label_key"),
              ExampleKind.GROUP: ("completion_key", "completions_key", "scores_key")}


def cache_key(source_fingerprint, spec: TokenizerSpec, data_cfg, split: str,
              kind: ExampleKind = ExampleKind.PAIR) -> str:
    keys = ("prompt_key", "chosen_key", "rejected_key", "max_length", "max_prompt_length", "truncation",
            "on_bad_row", "max_samples") + _KIND_KEYS.get(kind, ())
    settings = {key: data_cfg.get(key) for key in keys}
    identity = {"version": CACHE_VERSION, "source": source_fingerprint, "split": split,
                "tokenizer": tokenizer_fingerprint(spec), "settings": settings}
    if kind is not ExampleKind.PAIR:  # left out for pairs, so that their entries keep their keys
        identity["kind"] = kind.value
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _flatten(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], np.int64)
    flat = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros((0,), np.int32)
    return flat, lengths


def _unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def read_npz(path: str, names: tuple[str, ...], *, on_damage=None) -> dict[str, np.ndarray] | None:
    """The named arrays of an .npz, read whole (which checks every CRC); None when the file is absent, or
    damaged: then `on_damage(message)` hears one line about it, and the caller rebuilds the entry."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: np.array(z[name]) for name in names}
    except NPZ_READ_ERRORS as e:
        if on_damage is not None:
            on_damage(f"cache entry {path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                      "rebuilding it")
        return None


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a killed run never leaves a half-written entry under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# The id sequences of each kind's tokenized examples (TokenizedPairs also stores its margins, TokenizedRows
# its labels; TokenizedGroups its completions one after another, with each group's size and its scores).
_ARRAYS = {ExampleKind.PAIR: ("prompt_ids", "chosen_ids", "rejected_ids"),
           ExampleKind.UNPAIRED: ("prompt_ids", "completion_ids"),
           ExampleKind.GROUP: ("prompt_ids", "completion_ids")}
_EXTRA = {ExampleKind.PAIR: ("margins",), ExampleKind.UNPAIRED: ("labels",), ExampleKind.GROUP: ("group_sizes", "scores")}


def _group_arrays(groups: TokenizedGroups) -> dict[str, np.ndarray]:
    arrays = {}
    arrays["prompt_ids"], arrays["prompt_ids_lengths"] = _flatten(groups.prompt_ids)
    arrays["completion_ids"], arrays["completion_ids_lengths"] = _flatten([c for g in groups.completion_ids for c in g])
    arrays["group_sizes"] = np.array([len(g) for g in groups.completion_ids], np.int64)
    arrays["scores"] = np.concatenate(groups.scores).astype(np.float32) if len(groups) else np.zeros((0,), np.float32)
    return arrays


def _groups_of(z, prompts: list[np.ndarray], completions: list[np.ndarray], source) -> TokenizedGroups:
    starts = np.concatenate([[0], np.cumsum(z["group_sizes"])]).astype(np.int64)
    spans = list(itertools.pairwise(starts))
    return TokenizedGroups(prompts, [completions[a:b] for a, b in spans], [z["scores"][a:b] for a, b in spans],
                           source)


def save(path: str, pairs: TokenizedPairs | TokenizedRows | TokenizedGroups, section: dict,
         files: list[str]) -> None:
    """`files`: the source's files in order; rows are stored by their index there, so that a later run
    names them as it spells them."""
    arrays = {}
    unpaired = isinstance(pairs, TokenizedRows)
    if isinstance(pairs, TokenizedGroups):
        arrays = _group_arrays(pairs)
    else:
        for name in _ARRAYS[ExampleKind.UNPAIRED if unpaired else ExampleKind.PAIR]:
            arrays[name], arrays[name + "_lengths"] = _flatten(getattr(pairs, name))
    if unpaired:
        arrays["labels"] = np.asarray(pairs.labels, bool)
    elif isinstance(pairs, TokenizedPairs):
        arrays["margins"] = np.asarray(pairs.margins, np.float32)
    index = {f: i for i, f in enumerate(files)}
    arrays["source_file"] = np.array([index[f] for f, _ in pairs.source], np.int32)
    arrays["source_row"] = np.array([r for _, r in pairs.source], np.int64)
    arrays["meta"] = np.array(json.dumps({"section": section}))
    write_npz(path, arrays)


def load(path: str, files: list[str], kind: ExampleKind = ExampleKind.PAIR, *,
         on_damage=None) -> tuple[TokenizedPairs | TokenizedRows | TokenizedGroups, dict] | None:
    """The cached entry with its rows named by `files` (this run's spelling), or None when absent or damaged."""
    sequences = _ARRAYS[kind]
    names = (*sequences, *(n + "_lengths" for n in sequences), *_EXTRA[kind], "source_file", "source_row", "meta")
    z = read_npz(path, names, on_damage=on_damage)
    if z is None:
        return None
    seqs = [_unflatten(z[name], z[name + "_lengths"]) for name in sequences]
    source = [(files[i], int(r)) for i, r in zip(z["source_file"], z["source_row"])]
    section = json.loads(str(z["meta"]))["section"]
    if kind is ExampleKind.UNPAIRED:
        return TokenizedRows(*seqs, [bool(x) for x in z["labels"]], source), section
    if kind is ExampleKind.GROUP:
        return _groups_of(z, *seqs, source), section
    return TokenizedPairs(*seqs, source, [float(m) for m in z["margins"]]), section
