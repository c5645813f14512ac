"""Hub names for model paths (jaxdpo/models/hub.py), with no network: a Hugging Face cache laid out as
huggingface_hub lays it out (blobs named by etag, snapshot symlinks, refs), and a local endpoint started
here (HF_ENDPOINT) that answers the hub's model-info API for the bad-input cases."""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.models import hub
from jaxdpo.training.metrics import read_metrics
from tests.tiny_assets import tiny_run_config

REPO_ID = "acme/tiny-llama"
COMMIT = "a" * 40
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def etag_of(name: str, content: bytes) -> str:
    """The hub's etag: sha256 for LFS files (weights), git's blob sha1 for the others."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


def lay_snapshot(cache: str, repo: str, commit: str, model_dir: str, ref: str = "main") -> str:
    """`model_dir`'s files as huggingface_hub caches a download of `repo` at `commit` (ref -> commit)."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(model_dir)):
        with open(os.path.join(model_dir, name), "rb") as f:
            content = f.read()
        blob = os.path.join(storage, "blobs", etag_of(name, content))
        with open(blob, "wb") as f:
            f.write(content)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", ref), "w") as f:
        f.write(commit)
    return snapshot


@pytest.fixture()
def hub_env(monkeypatch, tmp_path):
    """An empty HF cache under HF_HOME and an endpoint nothing listens on (offline unless a test says)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return os.path.join(str(tmp_path / "hf_home"), "hub")


def go_online(monkeypatch):
    """HF_HUB_OFFLINE off, also in huggingface_hub, which read it when imported (conftest sets it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeHub(http.server.BaseHTTPRequestHandler):
    """GET /api/models/<org>/<name>[/revision/<rev>]: the hub's answers for known, unknown and .bin-only
    repos and unknown revisions."""
    repos = {REPO_ID: ["config.json", "model.safetensors", "tokenizer.json"],
             "acme/pickled": ["config.json", "pytorch_model.bin", "tokenizer.json"]}

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        repo, revision = "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main"
        if repo not in self.repos:
            return self._error(404 if "Authorization" in self.headers else 401, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self.repos[repo]]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def _error(self, status: int, code: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": code}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_names_and_paths(tmp_path, monkeypatch):
    assert hub.parse(str(tmp_path)) is None  # an existing path is a path, whatever its shape
    os.makedirs(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert hub.parse("org/name") is None
    assert hub.parse("Qwen/Qwen2.5-0.5B-Instruct") == hub.HubName("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert hub.parse("Qwen/Qwen2.5-0.5B-Instruct@v1.0") == hub.HubName("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")
    assert hub.parse("assets/demo/model") is None and hub.parse("./x/y") is None and hub.parse("") is None


def test_two_steps_from_a_cached_hub_name_then_a_changed_snapshot_is_refused(assets, hub_env, tmp_path):
    from jaxdpo.train import resolve_hub_names
    from jaxdpo.training.loop import train_and_evaluate

    snapshot = lay_snapshot(hub_env, REPO_ID, COMMIT, assets["model"])
    workdir = str(tmp_path / "run")
    config = tiny_run_config(assets, workdir, **{"model.path": REPO_ID, "train.steps": 2, "train.log_every": 1})
    resolved = resolve_hub_names(config)
    assert resolved.model.path == snapshot and config.model.path == REPO_ID
    assert hub.describe(resolved.model.path).startswith(f"{REPO_ID}@{COMMIT[:12]} (")
    train_and_evaluate(resolved)
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2]
    from jaxdpo.checkpoint.manager import newest_meta_on_disk

    recorded = newest_meta_on_disk(os.path.join(workdir, "checkpoints"))[hub.META_KEY]["model.path"]
    assert recorded["repo"] == REPO_ID and recorded["commit"] == COMMIT
    assert set(recorded["files"]) == set(os.listdir(assets["model"]))

    # The same command resolves the same commit, even after main moved on.
    newer = lay_snapshot(hub_env, REPO_ID, "b" * 40, assets["model"])
    assert resolve_hub_names(config).model.path == snapshot != newer
    # The pinned commit's weights changed in the cache (re-downloaded differently): one line, refused.
    weights = os.path.join(snapshot, "model.safetensors")
    with open(os.path.realpath(weights), "r+b") as f:
        f.seek(os.path.getsize(weights) - 4)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ConfigError, match=r"model.path = 'acme/tiny-llama': .*commit aaaaaaaaaaaa, whose cached file "
                                          r"model.safetensors changed"):
        resolve_hub_names(config)
    os.remove(weights)
    with pytest.raises(ConfigError, match="file model.safetensors is gone"):
        resolve_hub_names(config)


def test_offline_with_a_cache_and_an_unreachable_hub_fall_back_to_the_cache(assets, hub_env, monkeypatch):
    snapshot = lay_snapshot(hub_env, REPO_ID, COMMIT, assets["model"], ref="v1")
    assert hub.resolve(f"{REPO_ID}@v1", "model.path") == snapshot
    go_online(monkeypatch)  # the endpoint refuses connections: the cache answers
    assert hub.resolve(f"{REPO_ID}@v1", "model.tokenizer") == snapshot


@pytest.mark.parametrize("value, online, message", [
    ("acme/missing", True, "model.path = 'acme/missing': no model 'acme/missing' on http://127.0.0.1:"),
    ("acme/pickled", True, "model.path = 'acme/pickled': the repo has no .safetensors weights, only pickled "
                           "ones (pytorch_model.bin), which jaxdpo never loads"),
    (f"{REPO_ID}@v9", True, f"model.path = '{REPO_ID}@v9': {REPO_ID} has no revision 'v9'"),
    (REPO_ID, "unreachable", f"model.path = '{REPO_ID}': no local directory has that path, http://127.0.0.1:"),
    (REPO_ID, False, f"model.path = '{REPO_ID}': no local directory has that path, HF_HUB_OFFLINE is set and the Hugging Face cache"),
])
def test_bad_hub_names_are_one_line_and_write_nothing(assets, hub_env, fake_hub, monkeypatch, tmp_path, value,
                                                      online, message):
    if online:
        go_online(monkeypatch)
    if online is True:
        monkeypatch.setenv("HF_ENDPOINT", fake_hub)
    with pytest.raises(ConfigError) as error:
        hub.resolve(value, "model.path")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not os.path.exists(hub_env) or not os.listdir(hub_env)  # nothing fetched


def test_cli_exit_status_2_and_nothing_in_the_workdir(fake_hub, tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "HF_ENDPOINT": fake_hub, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-m", "jaxdpo.train", "--config=configs/dpo.py",
                             "--config.model.path=acme/missing", f"--config.workdir={workdir}"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"jaxdpo: model.path = 'acme/missing': no model 'acme/missing' on {fake_hub} (private or gated repos "
        f"need HF_TOKEN)"]
    assert result.stdout == "" and not workdir.exists()


def test_only_what_jaxdpo_reads_is_fetched():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin", "modeling_custom.py", "tokenizer.json",
            "tokenizer_config.json", "flax_model.msgpack", "onnx/model.onnx", "chat_template.jinja"]
    assert sorted(filter_repo_objects(repo, allow_patterns=list(hub.ALLOW_PATTERNS))) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
