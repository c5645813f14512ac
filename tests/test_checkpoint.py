"""Checkpoints on their own (issue 5): toy pytrees of sharded arrays, no trainer needed."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdpo.checkpoint import (Checkpointer, CorruptCheckpointWarning, abstract_like, config_fingerprint,
                               fingerprint_differences, install_preemption_handler)
from jaxdpo.config import ConfigError
from jaxdpo.sharding import make_mesh

FINGERPRINT = {"model": {"hidden_size": 32, "num_layers": 2}, "vocab_size": 300, "layout": "padded"}


def toy_state(mesh, seed: int = 0):
    """A trainer-like state: fsdp-sharded params (f32 and bf16), adam state, step, a typed PRNG key."""
    keys = jax.random.split(jax.random.key(seed), 3)
    fsdp_rows = NamedSharding(mesh, P("fsdp", None))
    params = {
        "embed": jax.device_put(jax.random.normal(keys[0], (64, 32), jnp.float32), fsdp_rows),
        "mlp": jax.device_put(jax.random.normal(keys[1], (32, 16), jnp.bfloat16), fsdp_rows),
        "norm": jax.device_put(jnp.linspace(-1, 1, 32), NamedSharding(mesh, P())),
    }
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, opt_state)
    replicated = NamedSharding(mesh, P())
    return {"params": params, "opt_state": opt_state,
            "step": jax.device_put(jnp.int32(seed), replicated),
            "rng": jax.device_put(keys[2], replicated)}


def abstract_on(mesh, state):
    """What a run on `mesh` asks restore for: same shapes/dtypes, this mesh's shardings (same specs)."""
    def on_mesh(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
    return jax.tree.map(on_mesh, state)


def assert_bit_equal(a_tree, b_tree):
    a_leaves, a_def = jax.tree.flatten(a_tree)
    b_leaves, b_def = jax.tree.flatten(b_tree)
    assert a_def == b_def
    for a, b in zip(a_leaves, b_leaves):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert a.dtype == b.dtype
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


@pytest.fixture
def mesh8():
    return make_mesh(1, 8, 1)


def save_steps(directory, mesh, steps, *, keep=3):
    with Checkpointer(directory, keep=keep, save_every=1) as ckpt:
        for step in steps:
            assert ckpt.save(step, toy_state(mesh, step), {"data_position": step * 8, "fingerprint": FINGERPRINT})


def test_roundtrip_is_bit_exact_and_save_copies_before_returning(tmp_path, mesh8):
    state = toy_state(mesh8, 5)
    expected = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), state)
    abstract = abstract_like(state)
    ckpt = Checkpointer(tmp_path, keep=2, save_every=10)
    assert ckpt.save(5, state, {"data_position": 40, "fingerprint": FINGERPRINT, "note": ("a", 1)}, force=True)
    # The trainer donates the state to the next step right after save(): buffers may vanish before the
    # background write finishes.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    ckpt.close()

    step, restored, meta = Checkpointer(tmp_path, keep=2, save_every=10).restore_latest(
        abstract, expected_meta_fingerprint=FINGERPRINT)
    assert step == 5
    assert meta == {"data_position": 40, "fingerprint": FINGERPRINT, "note": ["a", 1]}
    got = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), restored)
    assert_bit_equal(got, expected)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored["rng"].dtype == jax.random.key(0).dtype
    assert restored["params"]["embed"].sharding.spec == P("fsdp", None)
    # The restored key draws the same numbers as the saved one would have.
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                  jax.random.normal(toy_state(mesh8, 5)["rng"], (3,)))


def test_empty_directory_restores_nothing(tmp_path, mesh8):
    assert Checkpointer(tmp_path / "fresh", keep=1, save_every=1).restore_latest(
        abstract_like(toy_state(mesh8))) is None


def test_schedule_and_rotation_keep_newest(tmp_path, mesh8):
    ckpt = Checkpointer(tmp_path, keep=2, save_every=3)
    assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]
    meta = {"fingerprint": FINGERPRINT}
    assert not ckpt.save(4, toy_state(mesh8, 4), meta)  # off schedule
    for step in (3, 6, 7, 9):
        assert ckpt.save(step, toy_state(mesh8, step), meta, force=(step == 7))
    assert not ckpt.save(9, toy_state(mesh8, 9), meta, force=True)  # never rewrites a committed step
    ckpt.wait()
    assert ckpt.all_steps() == [7, 9]
    assert not ckpt.should_save(9)
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["7", "9"]
    ckpt.close()
    assert Checkpointer(tmp_path, keep=2, save_every=0).should_save(12) is False


def truncate_files(step_dir, subdir="state"):
    """Cut every data file of one item in half, as a disk-full or interrupted copy would."""
    count = 0
    for root, _, files in os.walk(os.path.join(step_dir, subdir)):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" in root and os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                count += 1
    assert count > 0


def test_truncated_newest_falls_back_to_previous(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [2, 4])
    truncate_files(tmp_path / "4")
    ckpt = Checkpointer(tmp_path, keep=3, save_every=2)
    with pytest.warns(CorruptCheckpointWarning, match=r"checkpoint step 4 .*unreadable.*trying the previous one"):
        step, restored, meta = ckpt.restore_latest(abstract_on(mesh8, toy_state(mesh8)))
    assert step == 2 and meta["data_position"] == 16
    assert_bit_equal(restored["params"], toy_state(mesh8, 2)["params"])


def test_unreadable_metadata_falls_back_and_all_bad_is_an_error(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [1, 2])
    with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
        f.write('{"data_posit')  # a half-written JSON file
    abstract = abstract_on(mesh8, toy_state(mesh8))
    with pytest.warns(CorruptCheckpointWarning, match="step 2"):
        assert Checkpointer(tmp_path, keep=3, save_every=1).restore_latest(abstract)[0] == 1
    shutil.rmtree(tmp_path / "1" / "state")
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(ConfigError, match="none can be restored"):
        Checkpointer(tmp_path, keep=3, save_every=1).restore_latest(abstract)


@pytest.mark.parametrize("n_devices", [4, 1])
def test_saved_on_8_devices_restores_on_fewer(tmp_path, mesh8, n_devices):
    save_steps(tmp_path, mesh8, [3])
    small_mesh = make_mesh(1, n_devices, 1, devices=jax.devices()[:n_devices])
    abstract = abstract_on(small_mesh, toy_state(mesh8))
    step, restored, _ = Checkpointer(tmp_path, keep=3, save_every=1).restore_latest(abstract)
    assert step == 3
    embed = restored["params"]["embed"]
    assert embed.sharding.mesh.devices.size == n_devices
    assert len(embed.addressable_shards) == n_devices
    assert embed.addressable_shards[0].data.shape == (64 // n_devices, 32)
    assert_bit_equal(jax.device_get(restored["params"]), jax.device_get(toy_state(mesh8, 3)["params"]))
    assert int(restored["step"]) == 3


def test_different_run_is_a_config_error(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [1])
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1)
    abstract = abstract_on(mesh8, toy_state(mesh8))
    other = {"model": {"hidden_size": 64, "num_layers": 2}, "vocab_size": 300, "layout": "packed"}
    with pytest.raises(ConfigError) as error:
        ckpt.restore_latest(abstract, expected_meta_fingerprint=other)
    message = str(error.value)
    assert "model.hidden_size: checkpoint=32 now=64" in message
    assert "layout: checkpoint='padded' now='packed'" in message
    assert "num_layers" not in message and "fresh workdir" in message
    # Without a fingerprint, a state of another shape is still caught before any array is read.
    bigger = dict(abstract, params=dict(abstract["params"], embed=jax.ShapeDtypeStruct(
        (128, 32), jnp.float32, sharding=abstract["params"]["embed"].sharding)))
    with pytest.raises(ConfigError, match=r"state/params/embed: checkpoint float32\[64, 32\] vs now"):
        ckpt.restore_latest(bigger)


def test_fingerprint_differences_lists_added_and_removed_keys():
    assert fingerprint_differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
    assert fingerprint_differences({"a": 1}, {"c": {"d": 2}}) == [
        "a: checkpoint=1 now=<absent>", "c.d: checkpoint=<absent> now=2"]


def test_config_fingerprint_flags_what_breaks_an_exact_resume():
    from configs import dpo

    config = dpo.get_config()
    saved = config_fingerprint(config, model_config={"hidden_size": 32, "rope_theta": 1e4}, vocab_size=300)
    changed = dpo.get_config()
    changed.optim.lr *= 2
    changed.data.layout = "packed"
    changed.model.dtype, changed.lora.dropout = "bfloat16", 0.1
    changed.mesh.fsdp, changed.train.steps, changed.train.save_every = 2, 500, 7  # allowed on resume
    changed.model.attention, changed.lora.export_merged = "auto", True
    now = config_fingerprint(changed, model_config={"hidden_size": 32, "rope_theta": 1e4}, vocab_size=300)
    assert fingerprint_differences(saved, now) == [
        "data.layout: checkpoint='padded' now='packed'",
        "lora.dropout: checkpoint=0.0 now=0.1",
        "model.dtype: checkpoint='float32' now='bfloat16'",
        f"optim.lr: checkpoint={config.optim.lr!r} now={changed.optim.lr!r}"]
    assert fingerprint_differences(saved, config_fingerprint(config, model_config={"hidden_size": 64,
                                   "rope_theta": 1e4}, vocab_size=300)) == [
        "model_config.hidden_size: checkpoint=32 now=64"]


def test_flax_nnx_state_with_the_real_optimizer_roundtrips_onto_one_device(tmp_path, mesh8):
    """The trainer's state: nnx.State params (Param variables, int layer keys) + jaxdpo.optim's chain."""
    from flax import nnx
    from ml_collections import ConfigDict

    from jaxdpo.optim import make_optimizer

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(64, 32, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
            self.norm = nnx.RMSNorm(32, rngs=rngs)

    _, params, _ = nnx.split(Tiny(nnx.Rngs(0)), nnx.Param, ...)
    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh8, P("fsdp") if x.ndim == 2 else P())),
                          params)
    optimizer, _ = make_optimizer(ConfigDict(dict(lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.99,
                                                  eps=1e-8, weight_decay=0.1, grad_clip=1.0)), 10)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(4),
             "bad_steps": jnp.int32(0)}
    with Checkpointer(tmp_path, keep=1, save_every=4) as ckpt:
        ckpt.save(4, state, {"data_position": np.int64(32)})
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, restored, meta = Checkpointer(tmp_path, keep=1, save_every=4).restore_latest(abstract_on(one, state))
    assert step == 4 and meta == {"data_position": 32}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_bit_equal(jax.device_get(restored), jax.device_get(state))


def test_uncommitted_tmp_directory_is_ignored(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [2])
    # Exactly what an async save killed before its final rename leaves behind (here complete, even).
    # Both tmp-name styles orbax has used (with and without a timestamp suffix).
    for name in ("5.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1700000000000000"):
        shutil.copytree(tmp_path / "2", tmp_path / name)
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1)
    assert ckpt.all_steps() == [2]
    assert ckpt.restore_latest(abstract_on(mesh8, toy_state(mesh8)))[0] == 2
    assert sorted(os.listdir(tmp_path)) == ["2"]  # leftovers are cleaned when a manager opens


def test_process_killed_during_async_save_keeps_previous(tmp_path):
    """A real interrupted async save: the process dies (no cleanup, like SIGKILL) right after save()."""
    script = textwrap.dedent(f"""
        import os
        import jax, jax.numpy as jnp
        from jaxdpo.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r}, keep=3, save_every=1)
        ckpt.save(1, {{"w": jnp.ones((4, 4))}}, {{}}); ckpt.wait()
        ckpt.save(2, {{"w": jnp.ones((4096, 4096))}}, {{}})  # 64 MiB: still being written when we die
        os._exit(0)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert not (tmp_path / "2").exists()
    assert (tmp_path / "2.orbax-checkpoint-tmp").exists() or any(
        name.startswith("2.orbax-checkpoint-tmp-") for name in os.listdir(tmp_path))  # it really was cut short
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1)
    assert ckpt.all_steps() == [1]
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    step, restored, _ = ckpt.restore_latest(abstract)
    assert step == 1 and float(restored["w"].sum()) == 16.0


@pytest.fixture
def restore_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_sets_the_preempted_flag(restore_signal_handlers, capsys):
    before = signal.getsignal(signal.SIGTERM)
    preempted = install_preemption_handler()
    assert preempted() is False
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted() is True and preempted(step=3) is True
    assert "SIGTERM received" in capsys.readouterr().err
    preempted.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == before


def test_first_ctrl_c_asks_to_stop_second_one_interrupts(restore_signal_handlers, capsys):
    preempted = install_preemption_handler()
    os.kill(os.getpid(), signal.SIGINT)
    assert preempted() is True
    assert "press Ctrl-C again" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the signal is delivered between bytecodes
            pass


# ----- end to end: a real run killed or preempted, then resumed (issue 5's acceptance) ----------------
# Every run is `jaxdpo.train`'s real entry point in its own process on 8 simulated devices. A run dies at an
# exact point: a driver patches Trainer.save (called after every step) so the process SIGKILLs (or SIGTERMs)
# itself there, so nothing depends on timing. The processes share a compile cache of their own (the first one
# compiles, the others load: about half of each later process's time): the cached 8-device step no longer
# deadlocks in XLA:CPU's all-reduce now that train.py turns off the concurrency-optimized CPU scheduler
# (DEVELOPING.md, CPU collectives), and a cache private to this module holds only executables compiled so.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("train/pairs_per_s", "train/tokens_per_s")
# save_every is not a multiple of log_every: checkpoints 2, 4 and a preemption at 5 all fall inside a logging
# window (records at 3 and 6), which a resume must continue, not restart.
E2E_OVERRIDES = {"train.steps": 6, "train.save_every": 2, "train.keep_checkpoints": 2, "train.log_every": 3,
                 "train.eval_every": 3, "train.export_hf": False}

# argv: repo, config file, then optionally a step and a signal name to send at that step's save call.
RUN_DRIVER = """
import os, signal, sys
repo, config_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
if len(sys.argv) > 3:
    at_step, signal_name = int(sys.argv[3]), sys.argv[4]
    from jaxdpo import trainer

    original_save = trainer.Trainer.save

    def save(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        if step == at_step and not getattr(self, "_signalled", False):
            self._signalled = True
            if signal_name == "SIGKILL":
                self.checkpointer.wait()  # this step's scheduled checkpoint, if any, is committed; die hard
            os.kill(os.getpid(), getattr(signal, signal_name))

    trainer.Trainer.save = save
sys.argv = ["jaxdpo.train", "--config=" + config_file]
from jaxdpo.train import run
run()
"""


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    from tests.tiny_assets import make_run_assets

    return make_run_assets(str(tmp_path_factory.mktemp("ckpt_assets")))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The persistent compile cache of this module's training processes."""
    return str(tmp_path_factory.mktemp("e2e_compile_cache"))


def _train(assets, workdir, compile_cache, *, signal_at: tuple[int, str] | None = None):
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
    command = [sys.executable, "-c", RUN_DRIVER, REPO, config_file]
    if signal_at is not None:
        command += [str(signal_at[0]), signal_at[1]]
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=compile_cache,
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _outcome(workdir):
    """Final params (from the end-of-run checkpoint) and metrics records without wall-clock fields."""
    from jaxdpo.metrics import read_metrics

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=2)
    final_step = ckpt.latest_step()
    assert final_step == E2E_OVERRIDES["train.steps"]
    state, _ = ckpt.read(final_step)
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]
    return jax.device_get(state["params"]), records


@pytest.fixture(scope="module")
def uninterrupted(run_assets, compile_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _train(run_assets, workdir, compile_cache)
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
        run_assets, compile_cache, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    # Killed at step 5: checkpoints 2 and 4 are committed, each inside a logging window (records at 3, 6).
    killed = _train(run_assets, workdir, compile_cache, signal_at=(5, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert Checkpointer(workdir / "checkpoints", keep=2, save_every=2).all_steps() == [2, 4]
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    truncate_files(damaged / "checkpoints" / "4")

    resumed = _train(run_assets, workdir, compile_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed    from checkpoint step 4" in resumed.stdout
    _assert_same_run(workdir, uninterrupted, after_step=4)

    resumed = _train(run_assets, damaged, compile_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 4" in resumed.stderr and "unreadable" in resumed.stderr
    assert "resumed    from checkpoint step 2" in resumed.stdout
    _assert_same_run(damaged, uninterrupted, after_step=2)


def test_sigterm_saves_exits_with_resume_message_and_resume_matches(run_assets, compile_cache, uninterrupted,
                                                                    tmp_path):
    workdir = tmp_path / "run"
    stopped = _train(run_assets, workdir, compile_cache, signal_at=(5, "SIGTERM"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM received" in stopped.stderr
    assert "to resume, rerun the same command" in stopped.stdout
    # Step 5 is off the save schedule: it was saved because of the signal, mid-window (steps 4-6).
    assert Checkpointer(workdir / "checkpoints", keep=2, save_every=2).all_steps() == [4, 5]
    resumed = _train(run_assets, workdir, compile_cache)
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

    from jaxdpo.metrics import MetricsWindow

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
    from jaxdpo.metrics import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


def _live_bytes(exclude_ids) -> int:
    return sum(x.nbytes for x in jax.live_arrays() if id(x) not in exclude_ids)


def _tree_bytes(*trees) -> int:
    return sum(x.nbytes for tree in trees for x in jax.tree.leaves(tree))


def _spy_build(monkeypatch, trainer_class):
    """Counts of fresh train states built and HF loads, and the bytes of the arrays made by the run that are
    alive right after its fresh state is built and right after a checkpoint is restored (the two moments
    a run holds the most: weights, optimizer state, reference)."""
    from jaxdpo import models

    seen = {"fresh_states": 0, "weight_loads": 0}
    # Held until the spy goes away, so no id of these can be reused by a new array meanwhile.
    seen["arrays_before"] = jax.live_arrays()
    before = {id(x) for x in seen["arrays_before"]}
    fresh_state, restore_latest, load = trainer_class._fresh_state, Checkpointer.restore_latest, models.from_pretrained

    def counting_fresh_state(self, *args, **kwargs):
        state = fresh_state(self, *args, **kwargs)
        seen["fresh_states"] += 1
        seen["bytes_after_fresh_state"] = _live_bytes(before)
        seen["held_after_fresh_state"] = _tree_bytes(state, self.frozen, self.reference)
        return state

    def measuring_restore(self, *args, **kwargs):
        restored = restore_latest(self, *args, **kwargs)
        seen["bytes_after_restore"] = _live_bytes(before)
        return restored

    def counting_load(*args, **kwargs):
        seen["weight_loads"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(trainer_class, "_fresh_state", counting_fresh_state)
    monkeypatch.setattr(Checkpointer, "restore_latest", measuring_restore)
    monkeypatch.setattr(models, "from_pretrained", counting_load)
    return seen


@pytest.fixture(scope="module")
def finished_runs(run_assets, tmp_path_factory):
    """name -> (workdir, final params, metrics records, what its build held) of an uninterrupted in-process
    run per MODES entry."""
    from jaxdpo.trainer import Trainer
    from tests.tiny_assets import tiny_run_config

    runs = {}
    for name, overrides in MODES.items():
        workdir = tmp_path_factory.mktemp(f"finished_{name}") / "run"
        with pytest.MonkeyPatch.context() as monkeypatch:
            spy = _spy_build(monkeypatch, Trainer)
            trainer = Trainer(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **overrides),
                              devices=jax.devices()[:1])
            trainer.run()
        assert spy["fresh_states"] == 1 and spy["bytes_after_fresh_state"] == spy["held_after_fresh_state"]
        del spy["arrays_before"]
        runs[name] = (workdir, jax.device_get(trainer.state["params"]), _records_without_timing(workdir), spy)
    return runs


@pytest.mark.parametrize("name", ["none", "lora"])
def test_described_state_is_the_fresh_state_without_values(run_assets, tmp_path, name):
    """What a resume restores into has the fresh state's tree, shapes, dtypes and shardings (here split over
    fsdp and tensor), and allocates nothing; LoRA's frozen base is real and equal to a fresh run's."""
    from jaxdpo.trainer import Trainer
    from tests.tiny_assets import tiny_run_config

    def built(resuming):
        trainer = Trainer(tiny_run_config(run_assets, str(tmp_path), **IN_PROCESS, **MODES[name],
                                          **{"mesh.fsdp": 4, "mesh.tensor": 2}))
        trainer.total_steps = IN_PROCESS["train.steps"]  # all build_steps needs from the data
        trainer.build_model(resuming=resuming)
        trainer.build_reference()
        trainer.build_steps()
        return trainer

    resumed, fresh = built(resuming=True), built(resuming=False)
    described, expected = jax.tree.leaves(resumed.state), jax.tree.leaves(abstract_like(fresh.state))
    assert jax.tree.structure(resumed.state) == jax.tree.structure(fresh.state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in described)
    for got, want in zip(described, expected):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert got.sharding.is_equivalent_to(want.sharding, len(want.shape)), (got.sharding, want.sharding)
    assert any(x.sharding.spec != P() for x in described)  # really sharded
    assert jax.tree.structure(resumed.frozen) == jax.tree.structure(fresh.frozen)
    assert_bit_equal(jax.device_get(resumed.frozen), jax.device_get(fresh.frozen))


def _copy_stopped_at_2(finished_runs, name, tmp_path):
    """The finished run's workdir as a run stopped after its step-2 checkpoint would leave it."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_runs[name][0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


@pytest.mark.parametrize("name", list(MODES))
def test_resume_builds_no_second_state_and_continues_exactly(finished_runs, run_assets, tmp_path, monkeypatch,
                                                             capsys, name):
    from jaxdpo.trainer import Trainer
    from tests.tiny_assets import tiny_run_config

    workdir = _copy_stopped_at_2(finished_runs, name, tmp_path)
    _, final_params, records, fresh = finished_runs[name]
    spy = _spy_build(monkeypatch, Trainer)
    trainer = Trainer(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **MODES[name]),
                      devices=jax.devices()[:1])
    trainer.run()
    assert "resumed    from checkpoint step 2" in capsys.readouterr().out
    assert spy["fresh_states"] == 0  # no fresh params + optimizer state built only to be overwritten
    assert spy["weight_loads"] == (0 if name == "none" else 1)  # the reference's or LoRA's frozen base
    # Right after restore the run's arrays are exactly the restored state, the reference and the frozen
    # weights (no second copy of the params or optimizer state): what a fresh run holds once built.
    held = _tree_bytes(trainer.state, trainer.frozen, trainer.reference)
    print(f"\n{name}: bytes alive after restore {spy['bytes_after_restore']}, held by the run {held}, "
          f"fresh run after building its state {fresh['bytes_after_fresh_state']}")
    assert spy["bytes_after_restore"] == held == fresh["bytes_after_fresh_state"]
    assert_bit_equal(jax.device_get(trainer.state["params"]), final_params)
    assert _records_without_timing(workdir) == records  # the window cut by the stop at step 2 included


def test_resume_that_finds_no_restorable_step_builds_the_fresh_state(finished_runs, run_assets, tmp_path,
                                                                     monkeypatch):
    """A step was listed when the build started but restore found nothing (it went away): start fresh."""
    from jaxdpo.trainer import Trainer
    from tests.tiny_assets import tiny_run_config

    workdir = _copy_stopped_at_2(finished_runs, "device", tmp_path)
    _, final_params, records, _ = finished_runs["device"]
    spy = _spy_build(monkeypatch, Trainer)
    monkeypatch.setattr(Checkpointer, "restore_latest", lambda self, *args, **kwargs: None)
    trainer = Trainer(tiny_run_config(run_assets, str(workdir), **IN_PROCESS, **MODES["device"]),
                      devices=jax.devices()[:1])
    trainer.run()
    assert spy["fresh_states"] == 1
    assert_bit_equal(jax.device_get(trainer.state["params"]), final_params)
    assert _records_without_timing(workdir) == records
