"""On-disk cache of tokenized pairs, so that a second run with the same inputs starts at once.

The key is a hash of everything tokenization depends on: the source files (path, size, mtime), the
tokenizer (its serialized vocabulary/merges, special tokens, chat template), the data keys, lengths,
truncation and bad-row policy, and a format version bumped whenever tokenization code changes its
output. An entry is one .npz (ids concatenated, with lengths) written atomically, so processes of a
multi-process run may all write the same entry safely.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxdpo.data.tokenize import TokenizedPairs, TokenizerSpec

# Bump when the tokenized output of the same inputs changes (tokenize.py, formats.py, truncation).
CACHE_VERSION = 1


def default_cache_dir(cache_dir: str) -> str:
    return os.path.expanduser(cache_dir or os.path.join("~", ".cache", "jaxdpo"))


def files_fingerprint(paths: list[str]) -> list:
    """(path, size, mtime_ns) of every file, walking directories: changes whenever a file is rewritten."""
    out = []
    for path in paths:
        files = ([os.path.join(root, n) for root, _, names in sorted(os.walk(path)) for n in sorted(names)]
                 if os.path.isdir(path) else [path])
        for f in files:
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_fingerprint(spec: TokenizerSpec) -> str:
    tok = spec.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    parts = [body, repr(getattr(tok, "special_tokens_map", {})), str(getattr(tok, "chat_template", None)),
             str(spec.chat_template), str(spec.adds_bos), str(spec.bos_id), str(spec.eos_id)]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def cache_key(source_fingerprint, spec: TokenizerSpec, data_cfg, split: str) -> str:
    settings = {key: data_cfg.get(key) for key in (
        "prompt_key", "chosen_key", "rejected_key", "max_length", "max_prompt_length", "truncation",
        "on_bad_row", "max_samples")}
    blob = json.dumps({"version": CACHE_VERSION, "source": source_fingerprint, "split": split,
                       "tokenizer": tokenizer_fingerprint(spec), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _flatten(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], np.int64)
    flat = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros((0,), np.int32)
    return flat, lengths


def _unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def save(path: str, pairs: TokenizedPairs, section: dict) -> None:
    arrays = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        arrays[name], arrays[name + "_lengths"] = _flatten(getattr(pairs, name))
    files = sorted({f for f, _ in pairs.source})
    index = {f: i for i, f in enumerate(files)}
    arrays["source_file"] = np.array([index[f] for f, _ in pairs.source], np.int32)
    arrays["source_row"] = np.array([r for _, r in pairs.source], np.int64)
    arrays["meta"] = np.array(json.dumps({"files": files, "section": section}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load(path: str) -> tuple[TokenizedPairs, dict] | None:
    """The cached entry, or None when absent or unreadable (a partial write from a killed run)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            seqs = {name: _unflatten(z[name], z[name + "_lengths"])
                    for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
            files = meta["files"]
            source = [(files[i], int(r)) for i, r in zip(z["source_file"], z["source_row"])]
    except (OSError, ValueError, KeyError):
        return None
    return TokenizedPairs(seqs["prompt_ids"], seqs["chosen_ids"], seqs["rejected_ids"], source), meta["section"]
