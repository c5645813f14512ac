"""Resume end to end: a real run killed or preempted and rerun, and what a resume builds, holds and logs."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdpo.checkpoint.manager import Checkpointer, abstract_like
from tests.helpers import assert_bit_equal, truncate_files
from tests.processes import jax_env

# ----- end to end: a real run killed or preempted, then resumed --------------------------------------------
# Every run is `python -m jaxdpo.train` in its own process on 2 simulated devices (params and optimizer
# state sharded over fsdp, so checkpoints are written and restored in shards). A run dies at an exact
# point: JAXDPO_FAULT (jaxdpo/training/faults.py) makes it SIGKILL (or SIGTERM) itself right after a given
# step's save call, so nothing depends on timing. The processes use the session's compile cache with the test
# processes' XLA flags (tests/processes.py jax_env): the first compiles, the others load.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("train/pairs_per_s", "train/tokens_per_s")
# save_every is not a multiple of log_every: checkpoints 2, 4 and a preemption at 5 all fall inside a logging
# window (records at 3 and 6), which a resume must continue, not restart.
E2E_OVERRIDES = {"train.steps": 6, "train.save_every": 2, "train.keep_checkpoints": 2, "train.log_every": 3,
                 "train.eval_every": 3, "train.export_hf": False}

@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    from tests.tiny_assets import make_run_assets

    return make_run_assets(str(tmp_path_factory.mktemp("ckpt_assets")))


def _train(assets, workdir, *, signal_at: tuple[int, str] | None = None):
    """Run the training entry point on `workdir` (same config every time, as a rerun would be)."""
    os.makedirs(workdir, exist_ok=True)
    config_file = os.path.join(workdir, "..", os.path.basename(workdir) + "_config.py")
    with open(config_file, "w") as f:
        f.write(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from tests.tiny_assets import tiny_run_config

            def get_config():
                return tiny_run_config({assets!r}, {str(workdir)!r}, **{E2E_OVERRIDES!r})
        """))
    command = [sys.executable, "-m", "jaxdpo.train", "--config=" + config_file]
    fault = {} if signal_at is None else {"JAXDPO_FAULT": f"{signal_at[1]}@checkpoints/{signal_at[0]}"}
    env = dict(os.environ, **fault, **jax_env(devices=2))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _outcome(workdir):
    """Final params (from the end-of-run checkpoint) and metrics records without wall-clock fields."""
    from jaxdpo.training.metrics import read_metrics

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=2)
    final_step = ckpt.latest_step()
    assert final_step == E2E_OVERRIDES["train.steps"]
    state, _ = ckpt.read(final_step)
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]
    return jax.device_get(state["params"]), records


@pytest.fixture(scope="module")
def uninterrupted(run_assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _train(run_assets, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return _outcome(workdir)


def _assert_same_run(workdir, uninterrupted, after_step):
    params, records = _outcome(workdir)
    reference_params, reference_records = uninterrupted
    assert_bit_equal(params, reference_params)
    later = lambda rs: [r for r in rs if r["step"] > after_step]  # noqa: E731
    assert later(records) == later(reference_records) and later(records)
    assert records == reference_records  # the whole file: nothing lost, nothing duplicated


def test_sigkill_then_rerun_matches_uninterrupted_and_truncated_newest_falls_back(
        run_assets, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    # Killed at step 5: checkpoints 2 and 4 are committed, each inside a logging window (records at 3, 6).
    killed = _train(run_assets, workdir, signal_at=(5, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert Checkpointer(workdir / "checkpoints", keep=2, save_every=2).all_steps() == [2, 4]
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    truncate_files(damaged / "checkpoints" / "4")

    resumed = _train(run_assets, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed    from checkpoint step 4" in resumed.stdout
    _assert_same_run(workdir, uninterrupted, after_step=4)

    resumed = _train(run_assets, damaged)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 4" in resumed.stderr and "unreadable" in resumed.stderr
    assert "resumed    from checkpoint step 2" in resumed.stdout
    _assert_same_run(damaged, uninterrupted, after_step=2)


def test_sigterm_saves_exits_with_resume_message_and_resume_matches(run_assets, uninterrupted,
                                                                    tmp_path):
    workdir = tmp_path / "run"
    stopped = _train(run_assets, workdir, signal_at=(5, "SIGTERM"))
    assert stopped.returncode == 75, stopped.stderr[-3000:]  # EX_TEMPFAIL: preempted, saved, rerun me
    assert "SIGTERM received" in stopped.stderr
    assert "to resume, rerun the same command" in stopped.stdout
    # Step 5 is off the save schedule: it was saved because of the signal, mid-window (steps 4-6).
    assert Checkpointer(workdir / "checkpoints", keep=2, save_every=2).all_steps() == [4, 5]
    resumed = _train(run_assets, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed    from checkpoint step 5" in resumed.stdout
    _assert_same_run(workdir, uninterrupted, after_step=5)


# ----- resume inside one process: what a resume builds, what it holds, what it logs ---------------------
# One device and the in-process compile cache keep these to seconds. save_every=2 with log_every=3: the
# checkpoint at step 2 falls inside the first logging window (steps 1-3).

IN_PROCESS = {"train.steps": 4, "train.save_every": 2, "train.log_every": 3, "data.eval_files": "",
              "train.export_hf": False}
MODES = {  # name -> config overrides
    "device": {"reference.mode": "device"},  # the reference is the initial weights: loaded on resume too
    "none": {"reference.mode": "none", "loss.types": ("simpo",)},  # nothing needs model.path's weights
    "lora": {"reference.mode": "device", "lora.rank": 4},  # frozen base loaded, adapters restored
}


def test_metrics_window_continued_from_its_saved_state_gives_the_same_means():
    """A window cut by a checkpoint and continued from the checkpoint's JSON meta logs bit-identical means."""
    import json

    from jaxdpo.training.metrics import MetricsWindow

    values = np.random.default_rng(0).normal(size=(5, 2)) * [1e-3, 1e4]  # magnitudes where order matters
    steps = [{"loss": jnp.float32(a), "grad_norm": jnp.float32(b), "pairs": jnp.float32(8),
              "tokens": jnp.float32(100 + i)} for i, (a, b) in enumerate(values)]
    whole = MetricsWindow()
    for metrics in steps:
        whole.add(metrics)
    before_stop = MetricsWindow()
    for metrics in steps[:2]:
        before_stop.add(metrics)
    saved = json.loads(json.dumps(before_stop.state()))  # as it travels in the checkpoint meta
    resumed = MetricsWindow.from_state(saved)
    for metrics in steps[2:]:
        resumed.add(metrics)
    assert len(resumed) == len(whole) == 5
    assert resumed.mean() == whole.mean()
    assert whole.mean()["loss"] == pytest.approx(float(np.mean(values[:, 0].astype(np.float32))), rel=1e-6)
    # Throughput counts only the steps this process ran: 3 steps of 8 pairs in 2 s.
    assert resumed.rates(2.0) == {"pairs_per_s": 12.0, "tokens_per_s": (102 + 103 + 104) / 2}
    assert len(MetricsWindow.from_state(None)) == 0  # a checkpoint from before windows were saved


def _records_without_timing(workdir):
    from jaxdpo.training.metrics import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


def _live_bytes(exclude_ids) -> int:
    return sum(x.nbytes for x in jax.live_arrays() if id(x) not in exclude_ids)


def _tree_bytes(*trees) -> int:
    return sum(x.nbytes for tree in trees for x in jax.tree.leaves(tree))


def _spy_build(monkeypatch):
    """Counts of fresh train states built and HF loads, and the bytes of the arrays made by the run that are
    alive right after its fresh state is built and right after a checkpoint is restored (the two moments
    a run holds the most: weights, optimizer state, reference). `held_after_fresh_state(run)`: what the
    run holds then: that state, its frozen weights and its reference (which a run never replaces)."""
    from jaxdpo.models import hf_io
    from jaxdpo.training import build

    seen = {"fresh_states": 0, "weight_loads": 0}
    # Held until the spy goes away, so no id of these can be reused by a new array meanwhile.
    seen["arrays_before"] = jax.live_arrays()
    before = {id(x) for x in seen["arrays_before"]}
    fresh_state, restore_latest, load = build.fresh_state, Checkpointer.restore_latest, hf_io.from_pretrained

    def counting_fresh_state(*args, **kwargs):
        state = fresh_state(*args, **kwargs)
        seen["fresh_states"] += 1
        seen["bytes_after_fresh_state"] = _live_bytes(before)
        seen["state_bytes_after_fresh_state"] = _tree_bytes(state)
        return state

    def measuring_restore(self, *args, **kwargs):
        restored = restore_latest(self, *args, **kwargs)
        seen["bytes_after_restore"] = _live_bytes(before)
        return restored

    def counting_load(*args, **kwargs):
        seen["weight_loads"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(build, "fresh_state", counting_fresh_state)
    monkeypatch.setattr(Checkpointer, "restore_latest", measuring_restore)
    monkeypatch.setattr(hf_io, "from_pretrained", counting_load)
    return seen


def _held_after_fresh_state(spy, run) -> int:
    return spy["state_bytes_after_fresh_state"] + _tree_bytes(run.policy.frozen, run.reference.params)


@pytest.fixture(scope="module")
def finished_runs(run_assets, tmp_path_factory):
    """name -> (workdir, final params, metrics records, what its build held) of an uninterrupted in-process
    run per MODES entry."""
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    runs = {}
    for name, overrides in MODES.items():
        workdir = tmp_path_factory.mktemp(f"finished_{name}") / "run"
        with pytest.MonkeyPatch.context() as monkeypatch:
            spy = _spy_build(monkeypatch)
            trainer = train_and_evaluate(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **overrides),
                                         devices=jax.devices()[:1])
        assert spy["fresh_states"] == 1 and spy["bytes_after_fresh_state"] == _held_after_fresh_state(spy, trainer)
        del spy["arrays_before"]
        runs[name] = (workdir, jax.device_get(trainer.state["params"]), _records_without_timing(workdir), spy)
    return runs


@pytest.mark.parametrize("name", ["none", "lora"])
def test_described_state_is_the_fresh_state_without_values(run_assets, tmp_path, name):
    """What a resume restores into has the fresh state's tree, shapes, dtypes and shardings (here split over
    fsdp and tensor), and allocates nothing; LoRA's frozen base is real and equal to a fresh run's."""
    import types

    from jaxdpo.training import build
    from tests.tiny_assets import tiny_run_config

    def built(resuming):
        config = tiny_run_config(run_assets, str(tmp_path), **IN_PROCESS, **MODES[name],
                                 **{"mesh.fsdp": 4, "mesh.tensor": 2})
        mesh = build.make_mesh(config)
        # all these builders need of the data (a preference objective reads no tokenizer)
        data = types.SimpleNamespace(total_steps=IN_PROCESS["train.steps"], tokenizer=None)
        policy = build.build_policy(config, mesh, resuming=resuming)
        reference = build.build_reference(config, mesh, policy, data)
        steps = build.build_steps(config, mesh, policy, reference, data)
        return types.SimpleNamespace(policy=policy, state=build.train_state(policy, steps, resuming=resuming))

    resumed, fresh = built(resuming=True), built(resuming=False)
    described, expected = jax.tree.leaves(resumed.state), jax.tree.leaves(abstract_like(fresh.state))
    assert jax.tree.structure(resumed.state) == jax.tree.structure(fresh.state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in described)
    for got, want in zip(described, expected):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert got.sharding.is_equivalent_to(want.sharding, len(want.shape)), (got.sharding, want.sharding)
    assert any(x.sharding.spec != P() for x in described)  # really sharded
    assert jax.tree.structure(resumed.policy.frozen) == jax.tree.structure(fresh.policy.frozen)
    assert_bit_equal(jax.device_get(resumed.policy.frozen), jax.device_get(fresh.policy.frozen))


def _copy_stopped_at_2(finished_runs, name, tmp_path):
    """The finished run's workdir as a run stopped after its step-2 checkpoint would leave it."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_runs[name][0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


@pytest.mark.parametrize("name", list(MODES))
def test_resume_builds_no_second_state_and_continues_exactly(finished_runs, run_assets, tmp_path, monkeypatch,
                                                             capsys, name):
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    workdir = _copy_stopped_at_2(finished_runs, name, tmp_path)
    _, final_params, records, fresh = finished_runs[name]
    spy = _spy_build(monkeypatch)
    trainer = train_and_evaluate(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **MODES[name]),
                      devices=jax.devices()[:1])
    assert "resumed    from checkpoint step 2" in capsys.readouterr().out
    assert spy["fresh_states"] == 0  # no fresh params + optimizer state built only to be overwritten
    assert spy["weight_loads"] == (0 if name == "none" else 1)  # the reference's or LoRA's frozen base
    # Right after restore the run's arrays are exactly the restored state, the reference and the frozen
    # weights (no second copy of the params or optimizer state): what a fresh run holds once built.
    held = _tree_bytes(trainer.state, trainer.policy.frozen, trainer.reference.params)
    print(f"\n{name}: bytes alive after restore {spy['bytes_after_restore']}, held by the run {held}, "
          f"fresh run after building its state {fresh['bytes_after_fresh_state']}")
    assert spy["bytes_after_restore"] == held == fresh["bytes_after_fresh_state"]
    assert_bit_equal(jax.device_get(trainer.state["params"]), final_params)
    assert _records_without_timing(workdir) == records  # the window cut by the stop at step 2 included


def test_resume_that_finds_no_restorable_step_builds_the_fresh_state(finished_runs, run_assets, tmp_path,
                                                                     monkeypatch):
    """A step was listed when the build started but restore found nothing (it went away): start fresh."""
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    workdir = _copy_stopped_at_2(finished_runs, "device", tmp_path)
    _, final_params, records, _ = finished_runs["device"]
    spy = _spy_build(monkeypatch)
    monkeypatch.setattr(Checkpointer, "restore_latest", lambda self, *args, **kwargs: None)
    trainer = train_and_evaluate(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **MODES["device"]),
                      devices=jax.devices()[:1])
    assert spy["fresh_states"] == 1
    assert_bit_equal(jax.device_get(trainer.state["params"]), final_params)
    assert _records_without_timing(workdir) == records
