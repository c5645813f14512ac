"""Checkpoints on their own: toy pytrees of sharded arrays, no trainer needed."""

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdpo.checkpoint.fingerprint import config_fingerprint, fingerprint_differences
from jaxdpo.checkpoint.manager import (
    Checkpointer,
    CorruptCheckpointWarning,
    abstract_like,
)
from jaxdpo.errors import ConfigError
from jaxdpo.parallel.sharding import make_mesh
from jaxdpo.training.preemption import install_preemption_handler
from tests.helpers import assert_bit_equal, truncate_files

FINGERPRINT = {"model": {"hidden_size": 32, "num_layers": 2}, "vocab_size": 300, "layout": "padded"}


def toy_state(mesh, seed: int = 0):
    """A train-like state: fsdp-sharded params (f32 and bf16), adam state, step, bad-step count."""
    keys = jax.random.split(jax.random.key(seed), 2)
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
            "bad_steps": jax.device_put(jnp.int32(seed + 1), replicated)}


def abstract_on(mesh, state):
    """What a run on `mesh` asks restore for: same shapes/dtypes, this mesh's shardings (same specs)."""
    def on_mesh(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
    return jax.tree.map(on_mesh, state)


@pytest.fixture
def mesh8():
    return make_mesh(1, 8, 1)


def save_steps(directory, mesh, steps, *, keep=3):
    with Checkpointer(directory, keep=keep, save_every=1) as ckpt:
        for step in steps:
            assert ckpt.save(step, toy_state(mesh, step), {"data_position": step * 8, "fingerprint": FINGERPRINT})


def test_roundtrip_is_bit_exact_and_save_copies_before_returning(tmp_path, mesh8):
    state = toy_state(mesh8, 5)
    expected = jax.tree.map(np.asarray, state)
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
    assert_bit_equal(jax.tree.map(np.asarray, restored), expected)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored["params"]["embed"].sharding.spec == P("fsdp", None)


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


def test_truncated_newest_falls_back_to_previous(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [2, 4])
    truncate_files(tmp_path / "4")
    ckpt = Checkpointer(tmp_path, keep=3, save_every=2)
    with pytest.warns(CorruptCheckpointWarning, match=r"checkpoint step 4 .*unreadable.*trying the previous one"):
        step, restored, meta = ckpt.restore_latest(abstract_on(mesh8, toy_state(mesh8)))
    assert step == 2 and meta["data_position"] == 16
    assert_bit_equal(restored["params"], toy_state(mesh8, 2)["params"])


def test_changed_values_fail_the_checksums_and_the_step_is_moved_aside_then_saved_again(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [2, 4], keep=2)
    # Readable arrays with other values than step 4 saved (what flipped bytes in a data block read as):
    # step 2's state files under step 4's checksums.
    shutil.rmtree(tmp_path / "4" / "state")
    shutil.copytree(tmp_path / "2" / "state", tmp_path / "4" / "state")
    ckpt = Checkpointer(tmp_path, keep=2, save_every=2)
    with pytest.warns(CorruptCheckpointWarning, match=r"step 4 .*checksum mismatch in state/.*moved to"):
        step, _, _ = ckpt.restore_latest(abstract_on(mesh8, toy_state(mesh8)))
    assert step == 2 and ckpt.all_steps() == [2]
    assert [n.split("-")[0] for n in os.listdir(tmp_path / "damaged")] == ["4"]
    assert ckpt.save(4, toy_state(mesh8, 4), {"fingerprint": FINGERPRINT})  # not "already on disk"
    ckpt.close()
    assert Checkpointer(tmp_path, keep=2, save_every=2).all_steps() == [2, 4]


def test_checksums_do_not_depend_on_the_mesh():
    from jaxdpo.checkpoint.checksums import state_checksums

    state = toy_state(make_mesh(1, 8, 1))
    on_one = jax.device_put(jax.device_get(state), jax.devices()[0])
    name = lambda path: jax.tree_util.keystr(path)  # noqa: E731
    assert state_checksums(state, name) == state_checksums(on_one, name)


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
    changed.optim.lr *= 2  # allowed on resume: the rate shapes only the updates to come
    changed.optim.b2 = 0.9
    changed.data.layout = "packed"
    changed.model.dtype, changed.lora.dropout = "bfloat16", 0.1
    changed.mesh.fsdp, changed.train.steps, changed.train.save_every = 2, 500, 7  # allowed on resume
    changed.model.attention, changed.lora.export_merged = "auto", True
    now = config_fingerprint(changed, model_config={"hidden_size": 32, "rope_theta": 1e4}, vocab_size=300)
    assert fingerprint_differences(saved, now) == [
        "data.layout: checkpoint='padded' now='packed'",
        "lora.dropout: checkpoint=0.0 now=0.1",
        "model.dtype: checkpoint='float32' now='bfloat16'",
        f"optim.b2: checkpoint={config.optim.b2!r} now=0.9"]
    assert fingerprint_differences(saved, config_fingerprint(config, model_config={"hidden_size": 64,
                                   "rope_theta": 1e4}, vocab_size=300)) == [
        "model_config.hidden_size: checkpoint=32 now=64"]


def test_flax_nnx_state_with_the_real_optimizer_roundtrips_onto_one_device(tmp_path, mesh8):
    """The trainer's state: nnx.State params (Param variables, int layer keys) + jaxdpo.training.optim's chain."""
    from flax import nnx
    from ml_collections import ConfigDict

    from jaxdpo.training.optim import make_optimizer

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
    assert sorted(os.listdir(tmp_path)) == ["2"]  # leftovers are gone before the constructor returns
    assert ckpt.all_steps() == [2]
    assert ckpt.restore_latest(abstract_on(mesh8, toy_state(mesh8)))[0] == 2


def test_a_process_that_exits_right_after_opening_checkpoints_prints_nothing(tmp_path):
    """A run that stops with a one-line error just after opening its checkpoint directory (a truncated
    weights file) must not exit under a cleanup still running in orbax's threads."""
    (tmp_path / "3.orbax-checkpoint-tmp-1700000000000000").mkdir()
    script = f"import sys; from jaxdpo.checkpoint.manager import Checkpointer; " \
             f"Checkpointer({str(tmp_path)!r}, keep=2, save_every=1); sys.exit(2)"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == "", result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_process_killed_during_async_save_keeps_previous(tmp_path):
    """A real interrupted async save: the process dies (no cleanup, like SIGKILL) right after save()."""
    script = textwrap.dedent(f"""
        import os
        import jax, jax.numpy as jnp
        from jaxdpo.checkpoint.manager import Checkpointer
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
