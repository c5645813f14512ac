"""Data identity is content: a streamed sha256 of every input file's bytes.

The digests key the tokenized-data cache (so a same-size rewrite that keeps the mtime is never served
from the cache) and go into the resume fingerprint (so a resumed run refuses changed data, and accepts
the same file however its path is spelled). Hashing reads each file once in chunks of a few MiB, far
faster than tokenizing it.
"""

from __future__ import annotations

import hashlib
import os

from jaxdpo.errors import ConfigError

CHUNK_BYTES = 4 << 20
# The key of the resume fingerprint that holds `data_identity(report)`.
FINGERPRINT_KEY = "data_identity"


def file_digest(path: str, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def path_digest(path: str) -> str:
    """sha256 of a file, or of a directory's files (names relative to it, then bytes, in sorted order)."""
    if not os.path.isdir(path):
        return file_digest(path)
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            file = os.path.join(root, name)
            digest.update(os.path.relpath(file, path).encode("utf-8") + b"\0" + file_digest(file).encode() + b"\0")
    return digest.hexdigest()


def files_identity(paths: list[str]) -> list[dict]:
    """[{"path": as given, "sha256": content digest}] of a source's resolved files, in order."""
    return [{"path": path, "sha256": path_digest(path)} for path in paths]


def data_identity(report: dict) -> dict:
    """What the resume fingerprint keeps of a data report: per split, each source's weight and its files'
    digests (with the paths as this run spells them, which the comparison ignores)."""
    out = {}
    for split in ("train", "eval"):
        sources = (report.get(split) or {}).get("sources", [])
        out[split] = [{"weight": s.get("weight"), "hub": s.get("hub"), "files": s.get("files", [])}
                      for s in sources]
    return out


def _content(identity: dict) -> dict:
    return {split: [{"weight": s["weight"], "hub": s["hub"], "sha256": [f["sha256"] for f in s["files"]]}
                    for s in sources] for split, sources in identity.items()}


def check_unchanged(saved: dict | None, now: dict, *, where: str) -> None:
    """Raise ConfigError (one line, naming the file) unless `now` reads the same bytes as `saved`.

    Paths may be spelled differently (relative, absolute, another copy): only contents, their order and
    the mixing weights count. `where` names the checkpoint in the message."""
    if saved is None:
        raise ConfigError(f"cannot resume from {where}: it records no data digests (written by an older jaxdpo); "
                          "use a fresh workdir")
    old, new = _content(saved), _content(now)
    if old == new:
        return
    for split in ("train", "eval"):
        key = f"data.{split}_files" if split == "train" else "data.eval_files / data.eval_fraction"
        a, b = old.get(split, []), new.get(split, [])
        if len(a) != len(b) or any(len(x["sha256"]) != len(y["sha256"]) for x, y in zip(a, b)):
            raise ConfigError(f"cannot resume from {where}: {key} now reads other files than the checkpoint's run "
                              "did; restore the original files, or use a fresh workdir")
        for i, (x, y) in enumerate(zip(a, b)):
            if x["weight"] != y["weight"] or x["hub"] != y["hub"]:
                raise ConfigError(f"cannot resume from {where}: source {i} of {key} changed (weight "
                                  f"{x['weight']} -> {y['weight']}); restore it, or use a fresh workdir")
            for j, (d_old, d_new) in enumerate(zip(x["sha256"], y["sha256"])):
                if d_old != d_new:
                    path = now[split][i]["files"][j]["path"]
                    raise ConfigError(f"cannot resume from {where}: data file {path!r} ({key}) changed since the "
                                      f"checkpoint was written (sha256 {d_old[:12]}... now {d_new[:12]}...); "
                                      "restore the file, or use a fresh workdir to train on the new data")
