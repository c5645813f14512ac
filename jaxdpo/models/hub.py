"""Hugging Face Hub names wherever a model directory is read: `org/name` or `org/name@revision`.

An existing local path is always a path. Anything else shaped like a repo id is fetched with
`huggingface_hub` into the HF cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; all
read when the name is resolved, not when huggingface_hub was imported), with its progress bars, and the
name is replaced by the snapshot directory `.../models--org--name/snapshots/<commit>`. Only what jaxdpo
reads is fetched: configs, tokenizer files and safetensors weights with their index; never pickled `.bin`
weights and never remote code. HF_TOKEN opens gated repos, HF_HUB_OFFLINE keeps to the cache, HF_ENDPOINT
names another hub.

The snapshot path itself says which repo and commit a run used (`source_of`), so the banner and the
checkpoint meta (`sources`) need no state of their own. A resume pins the commit its checkpoint recorded
(`resolve_config(config, pins=...)`) and is refused in one line when that commit's cached files differ
from the recorded ones or are gone. Every problem is one ConfigError naming the config key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

from jaxdpo.errors import ConfigError

# Config keys that may hold a hub name (the sample CLI's --model/--base call `resolve` directly).
HUB_KEYS = ("model.path", "model.tokenizer", "reference.path", "judge.reward_model")
# What jaxdpo reads from a model repo: everything else (pickles, remote code, other formats) stays remote.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# The checkpoint meta key of `sources`.
META_KEY = "hub"
DEFAULT_ENDPOINT = "https://huggingface.co"

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


@dataclasses.dataclass(frozen=True)
class HubName:
    repo: str
    revision: str | None  # None: the repo's default branch

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse(value: str) -> HubName | None:
    """The hub name `value` stands for; None when it is an existing local path or not shaped like a repo id
    (so a missing local directory keeps its own error message)."""
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return None
    match = _REPO_ID.match(value)
    return HubName(match["repo"], match["revision"]) if match else None


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps snapshots, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


# ----- resolving ---------------------------------------------------------------------------------------

def resolve(value: str, key: str, *, pin: dict | None = None) -> str:
    """The local directory `value` (config key `key`) stands for: `value` itself unless it is a hub name,
    else its snapshot in the HF cache, fetched when needed. `pin` (a `sources` record of the same repo)
    fixes the commit and the files it must still have."""
    name = parse(value)
    if name is None:
        return value
    if pin is not None and pin["repo"] == name.repo:
        return _pinned_snapshot(value, key, pin)
    commit = None if offline() else _remote_commit(value, key, name)
    return _snapshot(value, key, name.repo, commit or name.revision, local_only=commit is None)


def resolve_config(config, *, pins: dict | None = None):
    """A copy of `config` with each hub name under HUB_KEYS replaced by its local snapshot directory.
    `pins` = a checkpoint meta's `sources` record: a resume trains from the commits it recorded."""
    resolved = config.copy_and_resolve_references()
    for key in HUB_KEYS:
        section, field = key.split(".")
        value = resolved[section][field]
        if parse(value) is not None:
            resolved[section][field] = resolve(value, key, pin=(pins or {}).get(key))
    return resolved


def _remote_commit(value: str, key: str, name: HubName) -> str | None:
    """The commit `name` points at on the hub, after checking the repo has what jaxdpo reads; None when the
    hub cannot be reached (the cache is tried next)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(name.repo, revision=name.revision)
    except RevisionNotFoundError:
        raise ConfigError(f"{key} = {value!r}: {name.repo} has no revision {name.revision!r} on {endpoint()}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key} = {value!r}: no model {name.repo!r} on {endpoint()} (private or gated repos "
                          f"need HF_TOKEN)") from None
    except (HfHubHTTPError, *_network_errors()):
        return None
    _check_repo_files(value, key, [sibling.rfilename for sibling in info.siblings or []])
    return info.sha


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (huggingface_hub 2 ships `httpx2`, 1.x uses `httpx`)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return (httpx.TransportError, ConnectionError)


def _check_repo_files(value: str, key: str, files: list[str]) -> None:
    if "config.json" not in files:
        raise ConfigError(f"{key} = {value!r}: the repo has no config.json at its top level (not a transformers "
                          f"model)")
    if not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        raise ConfigError(f"{key} = {value!r}: the repo has no .safetensors weights"
                          + (f", only pickled ones ({pickled[0]}), which jaxdpo never loads" if pickled else ""))


def _snapshot(value: str, key: str, repo: str, revision: str | None, *, local_only: bool) -> str:
    """snapshot_download of the files jaxdpo reads; one ConfigError when neither hub nor cache has them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                 cache_dir=hub_cache_dir(), endpoint=endpoint(), local_files_only=local_only)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else f"{endpoint()} cannot be reached"
        raise ConfigError(f"{key} = {value!r}: no local directory has that path, {why} and the Hugging Face "
                          f"cache {hub_cache_dir()} has no copy of it") from None


def _pinned_snapshot(value: str, key: str, pin: dict) -> str:
    """The snapshot of the commit a checkpoint recorded, refused when its files are not the recorded ones."""
    path = _snapshot(value, key, pin["repo"], pin["commit"], local_only=True) if offline() else \
        _snapshot_or_fetch(value, key, pin)
    problem = _differences(pin["files"], path)
    if problem:
        raise ConfigError(f"{key} = {value!r}: the checkpoint was trained from commit {pin['commit'][:12]}, whose "
                          f"cached {problem}; restore it or start a fresh workdir")
    return path


def _snapshot_or_fetch(value: str, key: str, pin: dict) -> str:
    try:
        return _snapshot(value, key, pin["repo"], pin["commit"], local_only=True)
    except ConfigError:  # not cached here: the same commit from the hub
        return _snapshot(value, key, pin["repo"], pin["commit"], local_only=False)


def _differences(recorded: dict[str, str], path: str) -> str:
    """'' when the snapshot at `path` holds the recorded files with the recorded content, else what differs."""
    present = snapshot_files(path)
    for name, etag in sorted(recorded.items()):
        if name not in present:
            return f"file {name} is gone"
        if present[name] != etag:
            return f"file {name} changed"
    for name, etag in sorted(recorded.items()):
        if content_etag(os.path.join(path, name), etag) != etag:
            return f"file {name} changed"
    return ""


# ----- what a snapshot is -------------------------------------------------------------------------------

def source_of(path: str) -> dict | None:
    """{"repo", "commit"} of a snapshot directory of the HF cache; None for any other directory."""
    match = _SNAPSHOT.search(os.path.abspath(path)) if path else None
    return {"repo": f"{match['org']}/{match['name']}", "commit": match["commit"]} if match else None


def snapshot_files(path: str) -> dict[str, str]:
    """{relative path: etag} of a snapshot: each file links to the blob named by its etag (sha256 of an LFS
    file, git's blob sha1 of any other); a copied file (no symlinks) is named by its sha256."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            etag = os.path.basename(os.readlink(full)) if os.path.islink(full) else _sha256(full)
            files[os.path.relpath(full, path)] = etag
    return dict(sorted(files.items()))


def sources(config) -> dict[str, dict]:
    """{config key: {"repo", "commit", "files"}} for each key under HUB_KEYS that holds a cache snapshot:
    what a checkpoint records so that a resume trains from the same files."""
    out = {}
    for key in HUB_KEYS:
        section, field = key.split(".")
        source = source_of(config[section][field])
        if source is not None:
            out[key] = source | {"files": snapshot_files(config[section][field])}
    return out


def describe(path: str) -> str:
    """`path` as the banner shows it: `org/name@commit (path)` for a snapshot, else the path."""
    source = source_of(path)
    return f"{source['repo']}@{source['commit'][:12]} ({path})" if source else path


def content_etag(file: str, etag: str) -> str:
    """The etag of `file`'s content in the scheme of `etag`: sha256 (64 hex digits) or git blob sha1 (40)."""
    if len(etag) == 64:
        return _sha256(file)
    digest = hashlib.sha1(f"blob {os.path.getsize(file)}\0".encode())
    return _update_from_file(digest, file).hexdigest() if _COMMIT.match(etag) else ""


def _sha256(file: str) -> str:
    return _update_from_file(hashlib.sha256(), file).hexdigest()


def _update_from_file(digest, file: str, chunk: int = 1 << 22):
    with open(file, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest
