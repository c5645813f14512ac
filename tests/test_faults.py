"""Fault injection through the real entry point (`python -m jaxdpo.train`, issue 15): changed data on
resume, damaged caches, broken model files, too little data. Every run is its own process on one CPU
device; they share one compile cache, so only the first run compiles. The base run trains 4 steps with
relative data paths and a cached reference; every later test works on a copy of its workdir."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import damage
from tests.processes import REPO_ROOT

OVERRIDES = {"train.steps": 4, "train.save_every": 2, "train.keep_checkpoints": 2, "train.export_hf": False,
             "train.eval_every": 100, "reference.mode": "cached"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tests.tiny_assets import make_run_assets

    root = str(tmp_path_factory.mktemp("faults"))
    make_run_assets(root, n_train=24, n_eval=8)
    return root


def write_config(root: str, name: str, **overrides) -> str:
    """A config file for a run in root/name: tiny assets, data files as relative paths (run from `root`)."""
    assets = {"model": os.path.join(root, "model"), "train": "data/train.jsonl", "eval": "data/eval.jsonl"}
    path = os.path.join(root, f"{name}_config.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {REPO_ROOT!r})
            from tests.tiny_assets import tiny_run_config

            def get_config():
                return tiny_run_config({assets!r}, {os.path.join(root, name)!r},
                                       **{{**{OVERRIDES!r}, **{overrides!r}}})
        """))
    return path


def train(root: str, config_file: str, *flags: str, cwd: str | None = None):
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="true",
               JAX_COMPILATION_CACHE_DIR=os.path.join(root, "compile_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "jaxdpo.train", f"--config={config_file}", *flags]
    return subprocess.run(command, cwd=cwd or root, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    """The run failed with exit 2 and exactly one `jaxdpo:` line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("jaxdpo:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base(root):
    """A finished 4-step run (checkpoints 2 and 4, tokenized and reference caches) in root/base."""
    result = train(root, write_config(root, "base"))
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(root, "base")


def copy_run(root: str, base: str, name: str) -> str:
    """A copy of the base workdir and data at root/name (and root/name/data), with a config for it."""
    shutil.copytree(base, os.path.join(root, name))
    shutil.copytree(os.path.join(root, "data"), os.path.join(root, name, "data"))
    return write_config(root, name, **{"data.cache_dir": os.path.join(root, name, "cache")})


# ------------------------------------------------------------------------------ 5, 17: data identity on resume
def test_resume_accepts_the_same_file_by_its_absolute_path(root, base):
    config = copy_run(root, base, "absolute")
    data = os.path.join(root, "absolute", "data")
    result = train(root, config, f"--config.data.train_files={data}/train.jsonl",
                   f"--config.data.eval_files={data}/eval.jsonl", cwd=os.path.join(root, "absolute"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed    from checkpoint step 4" in result.stdout


def test_resume_refuses_swapped_chosen_and_rejected_in_a_same_size_file(root, base):
    config = copy_run(root, base, "swapped")
    path = os.path.join(root, "swapped", "data", "train.jsonl")
    stat = os.stat(path)
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:  # same bytes per row, chosen and rejected exchanged; then cp -p's mtime
        f.writelines(json.dumps({"prompt": r["prompt"], "rejected": r["chosen"], "chosen": r["rejected"]}) + "\n"
                     for r in rows)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    line = one_line_error(train(root, config, cwd=os.path.join(root, "swapped")))
    assert "data/train.jsonl" in line and "changed" in line


# ------------------------------------------------------------------------------ 14: damaged cache entries
def test_damaged_cache_entries_are_rebuilt(root, base):
    config = copy_run(root, base, "damaged")
    cache = os.path.join(root, "damaged", "cache")
    (tokenized,) = [n for n in os.listdir(os.path.join(cache, "tokenized")) if n.endswith(".npz")][:1] or [None]
    damage(os.path.join(cache, "tokenized", tokenized), "truncated")
    for name in os.listdir(os.path.join(cache, "reference")):
        damage(os.path.join(cache, "reference", name), "bad_crc")
    result = train(root, config, cwd=os.path.join(root, "damaged"))
    assert result.returncode == 0, result.stderr[-3000:]
    damaged_lines = [line for line in result.stdout.splitlines() if "is damaged" in line]
    assert any("tokenized" in line for line in damaged_lines) and any("reference" in line for line in damaged_lines)
    assert "computed" in result.stdout  # the reference logprobs were computed again
    again = train(root, config, cwd=os.path.join(root, "damaged"))
    assert again.returncode == 0 and "is damaged" not in again.stdout


# ------------------------------------------------------------------------------ 16: model files
def broken_model(root: str, name: str, edit) -> str:
    model = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "model"), model)
    edit(model)
    return model


def test_config_json_missing_a_key_is_one_line(root, base):
    def drop_key(model):
        path = os.path.join(model, "config.json")
        config = json.load(open(path))
        del config["num_hidden_layers"]
        json.dump(config, open(path, "w"))

    model = broken_model(root, "model_no_layers", drop_key)
    line = one_line_error(train(root, write_config(root, "no_layers"), f"--config.model.path={model}"))
    assert "config.json" in line and "num_hidden_layers" in line


def test_garbage_safetensors_is_one_line(root, base):
    def garbage(model):
        with open(os.path.join(model, "model.safetensors"), "wb") as f:
            f.write(os.urandom(4096))

    model = broken_model(root, "model_garbage", garbage)
    line = one_line_error(train(root, write_config(root, "garbage"), f"--config.model.path={model}"))
    assert "model.safetensors" in line


def test_truncated_safetensors_is_one_line(root, base):
    def truncate(model):
        path = os.path.join(model, "model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])

    model = broken_model(root, "model_truncated", truncate)
    line = one_line_error(train(root, write_config(root, "truncated"), f"--config.model.path={model}"))
    assert "model.safetensors" in line


# ------------------------------------------------------------------------------ 18: too little data
def test_fewer_pairs_than_one_batch_fails_before_compiling(root, base):
    result = train(root, write_config(root, "small", **{"train.batch_size": 32, "train.micro_batch_size": 32,
                                                        "train.eval_batch_size": 8}))
    line = one_line_error(result)
    assert "train.batch_size=32" in line and "data/train.jsonl" in line
    assert "pairs/step" not in result.stdout  # found while building the data: no banner, no step, no eval
