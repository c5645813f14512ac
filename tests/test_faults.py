"""Fault injection through the real entry point (`python -m jaxdpo.train`): changed data on
resume, damaged caches and checkpoints, a bad workdir or a full disk, divergence, preemption, a
half-written metrics line. Every run is its own process on one CPU device; they share one compile cache,
so only the first run compiles. The base run trains 4 steps with relative data paths and a cached
reference; every later test works on a copy of its workdir.

Broken model files, too little data, a workdir that is a file and a resume refused for changed data or
settings stop a run while it loads, before anything is compiled: those tests build the run in this process and check the ConfigError it stops with, which the entry point prints
as one `jaxdpo:` line with exit status 2 (tests/test_config_errors.py and the runs here check that path)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import damage, train_here, truncate_files
from tests.processes import REPO_ROOT, jax_env

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


def train_env(root: str) -> dict:
    return dict(os.environ, **jax_env(devices=1))


def train_command(config_file: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "jaxdpo.train", f"--config={config_file}", *flags]


def train(root: str, config_file: str, *flags: str, cwd: str | None = None):
    return subprocess.run(train_command(config_file, *flags), cwd=cwd or root, env=train_env(root),
                          capture_output=True, text=True, timeout=600)


def rerun(root: str, name: str, capfd, **overrides) -> tuple[str, list[str]]:
    """The run of root/name_config.py trained again in this process, from root/name on one device, as the
    CLI would: (its stdout, its `jaxdpo:` notices)."""
    from jaxdpo.train import load_config_file
    from tests.tiny_assets import set_overrides

    config = set_overrides(load_config_file(os.path.join(root, f"{name}_config.py")), overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(os.path.join(root, name))
        return train_here(config, capfd)


def load_error(root: str, name: str, *, data: str = "", **overrides) -> str:
    """The ConfigError a run in root/name stops with while it loads, on one device as the CLI runs (tiny
    assets; data files by absolute path, from `data` or root/data)."""
    import jax

    from jaxdpo.errors import ConfigError
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    data = data or os.path.join(root, "data")
    assets = {"model": os.path.join(root, "model"), "train": os.path.join(data, "train.jsonl"),
              "eval": os.path.join(data, "eval.jsonl")}
    config = tiny_run_config(assets, os.path.join(root, name), **{**OVERRIDES, **overrides})
    with pytest.raises(ConfigError) as stopped:
        train_and_evaluate(config, devices=jax.devices()[:1])
    return str(stopped.value)


def one_line_error(result) -> str:
    """The run failed with exit 2 and exactly one `jaxdpo:` line on stderr, no traceback."""
    if result.returncode != 2:  # pytest.fail keeps the whole message (an assert's is cut short under -q)
        pytest.fail(f"exit status {result.returncode}, stderr:\n{result.stderr[-4000:]}")
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


# ------------------------------------------------------------------------------ data identity on resume
def test_resume_accepts_the_same_file_by_its_absolute_path(root, base, capfd):
    copy_run(root, base, "absolute")
    data = os.path.join(root, "absolute", "data")
    stdout, _ = rerun(root, "absolute", capfd, **{"data.train_files": f"{data}/train.jsonl",
                                                  "data.eval_files": f"{data}/eval.jsonl"})
    assert "resumed    from checkpoint step 4" in stdout


def test_resume_refuses_swapped_chosen_and_rejected_in_a_same_size_file(root, base):
    copy_run(root, base, "swapped")
    path = os.path.join(root, "swapped", "data", "train.jsonl")
    stat = os.stat(path)
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:  # same bytes per row, chosen and rejected exchanged; then cp -p's mtime
        f.writelines(json.dumps({"prompt": r["prompt"], "rejected": r["chosen"], "chosen": r["rejected"]}) + "\n"
                     for r in rows)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    line = load_error(root, "swapped", data=os.path.join(root, "swapped", "data"),
                      **{"data.cache_dir": os.path.join(root, "swapped", "cache")})
    assert "data/train.jsonl" in line and "changed" in line


# ------------------------------------------------------------------------------ damaged cache entries
def test_damaged_cache_entries_are_rebuilt(root, base, capfd):
    copy_run(root, base, "damaged")
    cache = os.path.join(root, "damaged", "cache")
    (tokenized,) = [n for n in os.listdir(os.path.join(cache, "tokenized")) if n.endswith(".npz")][:1] or [None]
    damage(os.path.join(cache, "tokenized", tokenized), "truncated")
    for name in os.listdir(os.path.join(cache, "reference")):
        damage(os.path.join(cache, "reference", name), "bad_crc")
    stdout, _ = rerun(root, "damaged", capfd)
    damaged_lines = [line for line in stdout.splitlines() if "is damaged" in line]
    assert any("tokenized" in line for line in damaged_lines) and any("reference" in line for line in damaged_lines)
    assert "computed" in stdout  # the reference logprobs were computed again
    again, _ = rerun(root, "damaged", capfd)
    assert "is damaged" not in again


# ------------------------------------------------------------------------------ model files
def broken_model(root: str, name: str, edit) -> str:
    model = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "model"), model)
    edit(model)
    return model


def test_config_json_missing_a_key_is_one_line(root):
    def drop_key(model):
        path = os.path.join(model, "config.json")
        config = json.load(open(path))
        del config["num_hidden_layers"]
        json.dump(config, open(path, "w"))

    model = broken_model(root, "model_no_layers", drop_key)
    line = load_error(root, "no_layers", **{"model.path": model})
    assert "config.json" in line and "num_hidden_layers" in line


def test_garbage_safetensors_is_one_line(root):
    def garbage(model):
        with open(os.path.join(model, "model.safetensors"), "wb") as f:
            f.write(os.urandom(4096))

    model = broken_model(root, "model_garbage", garbage)
    line = load_error(root, "garbage", **{"model.path": model})
    assert "model.safetensors" in line


def test_truncated_safetensors_is_one_line(root):
    def truncate(model):
        path = os.path.join(model, "model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])

    model = broken_model(root, "model_truncated", truncate)
    line = load_error(root, "truncated", **{"model.path": model})
    assert "model.safetensors" in line


# ------------------------------------------------------------------------------ too little data
def test_fewer_pairs_than_one_batch_fails_before_compiling(root, capsys):
    line = load_error(root, "small", **{"train.batch_size": 32, "train.micro_batch_size": 32,
                                        "train.eval_batch_size": 8})
    assert "train.batch_size=32" in line and "data/train.jsonl" in line
    assert "pairs/step" not in capsys.readouterr().out  # found while building the data: no banner, no step


# ------------------------------------------------------------------------------ damaged checkpoints
def checkpoint_steps(workdir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def notices(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("jaxdpo:")]


def test_damaged_newest_checkpoint_is_moved_aside_and_saved_again(root, base, capfd):
    copy_run(root, base, "damaged_ckpt")
    workdir = os.path.join(root, "damaged_ckpt")
    truncate_files(os.path.join(workdir, "checkpoints", "4"))
    stdout, set_aside = rerun(root, "damaged_ckpt", capfd)
    (line,) = [line for line in set_aside if "checkpoint step 4" in line]
    assert "moved to" in line
    assert "resumed    from checkpoint step 2" in stdout
    (moved,) = os.listdir(os.path.join(workdir, "checkpoints", "damaged"))
    assert moved.startswith("4-")
    assert checkpoint_steps(workdir) == [2, 4]  # step 4 saved again; the good step 2 was not rotated out
    again, _ = rerun(root, "damaged_ckpt", capfd)
    assert "resumed    from checkpoint step 4" in again


def flip_bytes(path: str, count: int = 8) -> None:
    data = bytearray(open(path, "rb").read())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_detected_and_never_exported(root, base, capfd):
    copy_run(root, base, "flipped")
    workdir = os.path.join(root, "flipped")
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    files = [os.path.join(r, n) for r, _, names in os.walk(state_dir) for n in names]
    flip_bytes(max(files, key=os.path.getsize))  # the arrays' data file
    stdout, set_aside = rerun(root, "flipped", capfd, **{"train.export_hf": True})
    assert any("checkpoint step 4" in line and "checksum mismatch" in line for line in set_aside)
    assert "resumed    from checkpoint step 2" in stdout
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(workdir, "hf", "model.safetensors"))
    assert all(np.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------------------------------ divergence
def test_divergence_stops_at_the_limit_between_logs_saves_and_exits_3(root, base):
    # beta 1e38: every step's loss or gradient overflows. log_every 25 > steps: only a per-step check stops it.
    config = write_config(root, "diverged", **{"loss.beta": 1e38, "train.steps": 8, "train.save_every": 6,
                                               "train.log_every": 25, "train.max_bad_steps": 2})
    result = train(root, config)
    assert result.returncode == 3, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    (line,) = notices(result)
    assert "max_bad_steps=2" in line and "optim.lr" in line
    workdir = os.path.join(root, "diverged")
    (saved,) = checkpoint_steps(workdir)  # the newest state, saved at the stop (before the scheduled 6)
    assert saved <= 4 and f"checkpoint step {saved}" in line


def test_learning_rate_and_steps_may_change_on_resume(root, base, capfd):
    from jaxdpo.training.metrics import read_metrics

    copy_run(root, base, "new_lr")
    workdir = os.path.join(root, "new_lr")
    stdout, _ = rerun(root, "new_lr", capfd, **{"optim.lr": 2e-4, "train.steps": 6})
    assert "changed    optim.lr: 0.001 -> 0.0002 (from step 4 on)" in stdout
    assert {"step": 4, "resume/optim.lr": 2e-4, "resume/train.steps": 6.0} in read_metrics(workdir)
    refused = load_error(root, "new_lr", data=os.path.join(workdir, "data"),
                         **{"data.cache_dir": os.path.join(workdir, "cache"), "optim.b2": 0.9, "train.steps": 8})
    assert "optim.b2" in refused


# ------------------------------------------------------------------------------ preemption exit status
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_preempted_run_exits_75_after_saving(root, base, signal_name):
    config = write_config(root, f"preempted_{signal_name}", **{"train.steps": 2000, "train.save_every": 5000,
                                                                  "train.log_every": 50})
    process = subprocess.Popen(train_command(config), cwd=root, env=train_env(root), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    while "train:" not in seen:  # the progress bar exists once the signal handlers are installed
        char = process.stderr.read(1)
        assert char, seen[-3000:]
        seen += char
    process.send_signal(getattr(signal, signal_name))
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 75, (process.returncode, (seen + stderr)[-3000:])
    assert "to resume, rerun the same command" in stdout
    (saved,) = checkpoint_steps(os.path.join(root, f"preempted_{signal_name}"))
    assert 0 < saved < 2000


# ------------------------------------------------------------------------------ partial metrics line
def test_partial_last_metrics_line_does_not_block_resume(root, base, capfd):
    from jaxdpo.training.metrics import read_metrics

    copy_run(root, base, "partial_metrics")
    workdir = os.path.join(root, "partial_metrics")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "train/lo')  # a crash mid-write
    _, set_aside = rerun(root, "partial_metrics", capfd, **{"train.steps": 6})
    (line,) = [line for line in set_aside if "metrics.jsonl" in line]
    assert "partial last line" in line
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------ workdir and disk
def test_workdir_that_is_a_file_is_one_line(root, base):
    path = os.path.join(root, "a_file")
    open(path, "w").write("not a directory")
    line = load_error(root, "a_file")
    assert path in line and "is a file" in line


def read_only_directory(root: str) -> str:
    """A directory this process cannot write in: chmod 555 where permissions apply, else a read-only mount."""
    if os.geteuid() != 0:
        path = os.path.join(root, "read_only")
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o555)
        return path
    for mount in ("/sys", "/proc/sys"):
        if os.path.isdir(mount) and os.statvfs(mount).f_flag & os.ST_RDONLY:
            return mount
    pytest.skip("running as root with no read-only mount to write into")


def test_read_only_workdir_is_one_line(root, base):
    path = os.path.join(read_only_directory(root), "run")
    line = one_line_error(train(root, write_config(root, "ro_workdir"), f"--config.workdir={path}"))
    assert path in line and "not writable" in line


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(root, base):
    config = copy_run(root, base, "disk_full")
    workdir = os.path.join(root, "disk_full")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the rerun trains 3-4 and saves 4 again
    data_dir = os.path.join(workdir, "checkpoints", "2", "state", "ocdbt.process_0", "d")
    data = sum(os.path.getsize(os.path.join(data_dir, n)) for n in os.listdir(data_dir))
    # orbax cuts the state's data into a varying number of files (2 to 5 seen); a save into fewer than 8
    # writes one of at least data / 8, while every metadata, metrics and log file stays far smaller
    limit = data // 8

    def file_size_limit():  # writes past it fail with EFBIG, as they would with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(train_command(config), cwd=workdir, env=train_env(root), capture_output=True, text=True,
                            timeout=600, preexec_fn=file_size_limit)
    line = one_line_error(result)
    assert "Exception ignored" not in result.stderr
    assert os.path.join(workdir, "checkpoints") in line and "checkpoint step 2 is intact" in line
    assert checkpoint_steps(workdir) == [2]


def test_disk_full_during_the_export_is_one_line_naming_the_committed_checkpoints(root, monkeypatch):
    import errno

    from jaxdpo.training import loop

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop, "save_pretrained", no_space)
    line = load_error(root, "export_full", **{"train.steps": 2, "train.save_every": 2, "data.eval_files": "",
                                              "train.export_hf": True})
    workdir = os.path.join(root, "export_full")
    assert line.startswith(f"could not write the export in {workdir} (No space left on device); the run's "
                           "checkpoints are complete.")
    assert f"python tools/convert_to_hf.py {os.path.join(workdir, 'checkpoints')} OUT_DIR" in line
    assert checkpoint_steps(workdir) == [2]


def test_damaged_checkpoint_never_reaches_an_export(root, base):
    from jaxdpo.checkpoint.saved_policy import read_params
    from jaxdpo.errors import ConfigError

    checkpoints = os.path.join(root, "export_damaged")
    shutil.copytree(os.path.join(base, "checkpoints"), checkpoints)
    shutil.rmtree(os.path.join(checkpoints, "4", "state"))  # readable arrays, other values than step 4's
    shutil.copytree(os.path.join(checkpoints, "2", "state"), os.path.join(checkpoints, "4", "state"))
    read_params(checkpoints, 2)
    with pytest.raises(ConfigError, match="checkpoint step 4 .* is damaged .checksum mismatch in state/params"):
        read_params(checkpoints, 4)
