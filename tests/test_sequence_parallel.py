"""Rows split along their tokens over the `sequence` mesh axis (zigzag ring attention).

Every comparison is against the unsharded XLA path on the rows in their original order: the attention
op on rows of all three layouts, then the tiny decoder's per-pair logprobs and their gradients."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dpo
from jaxdpo import config as config_lib
from jaxdpo.data import layouts
from jaxdpo.errors import ConfigError
from jaxdpo.models import Decoder
from jaxdpo.ops.attention import attention, make_attention_mask
from jaxdpo.ops.ring_attention import ring_attention
from jaxdpo.parallel import sequence_parallel
from jaxdpo.parallel.sharding import make_mesh
from jaxdpo.training.batches import batch_shardings
from jaxdpo.training.step import pair_logprobs
from tests.helpers import TINY, gemma2_like, memoized_trainings

T = 32  # every layout's rows; a multiple of 2 * 8
PAIRS = [([5, 9, 2, 7, 1], [11, 3, 8, 6], [4, 6, 2]),
         ([3, 4], [7, 7, 8, 9, 10, 2], [6]),
         ([8, 1, 2, 3, 4, 5, 6], [9, 2], [12, 13, 14, 2])]
# (data, fsdp, sequence, tensor): sequence 1, 2, 4, 8 and the mixed mesh of the issue
MESHES = {"seq1": (1, 8, 1, 1), "seq2": (1, 4, 2, 1), "seq4": (2, 1, 4, 1), "seq8": (1, 1, 8, 1),
          "fsdp2-seq2-tensor2": (1, 2, 2, 2)}
CONFIG = dataclasses.replace(TINY, vocab_size=32)
GEMMA2_LIKE = gemma2_like(CONFIG, sliding_window=4)  # softcaps, a sliding and a global layer: every mask rule


def mesh_of(name):
    data, fsdp, sequence, tensor = MESHES[name]
    return make_mesh(data, fsdp, tensor, sequence=sequence)


def layout_batches(num_pairs=len(PAIRS), packed_rows=None):
    """{layout: micro-batch} of the same three pairs, rows of T tokens each."""
    return {layout: layouts.make_batch(PAIRS, layout=layout, row_length=T, num_pairs=num_pairs,
                                       num_rows=packed_rows if layout == "packed" else None)
            for layout in layouts.LAYOUTS}


def all_rows():
    """The row arrays of all three layouts stacked (12 rows), and which rows came from which layout."""
    batches = layout_batches()
    rows = {key: np.concatenate([b[key] for b in batches.values()]) for key in layouts.ROW_KEYS}
    counts = np.cumsum([0] + [len(b["input_ids"]) for b in batches.values()])
    return rows, {layout: slice(counts[i], counts[i + 1]) for i, layout in enumerate(batches)}


def test_zigzag_order_balances_chunks_and_inverts():
    order = sequence_parallel.zigzag_order(16, 4)
    np.testing.assert_array_equal(order.reshape(4, 2, 2)[:, :, 0] // 2, [[0, 7], [1, 6], [2, 5], [3, 4]])
    np.testing.assert_array_equal(order[sequence_parallel.inverse_order(order)], np.arange(16))
    batch = layout_batches()["prefix_shared"]
    batch["scored_index"] = layouts.scored_index(batch["side"], 16)
    zig = sequence_parallel.to_zigzag(batch, 4)
    for key in layouts.ROW_KEYS:
        np.testing.assert_array_equal(np.sort(zig[key], axis=1), np.sort(batch[key], axis=1))
    # scored_index [R, shard, k]: each shard's scored tokens, once each, as indices into its T/4 slice
    width = T // 4
    assert zig["scored_index"].shape == (len(batch["side"]), 4, min(16, width))
    for row in range(len(batch["side"])):
        for shard in range(4):
            index = zig["scored_index"][row, shard]
            scored = np.flatnonzero(zig["side"][row, shard * width:(shard + 1) * width] > 0)
            np.testing.assert_array_equal(index[index >= 0], scored)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ring_attention_matches_xla_on_every_layout(mesh_name):
    rows, by_layout = all_rows()
    seg, br, pos = (jnp.asarray(rows[k]) for k in ("segment_ids", "branch_ids", "positions"))
    b, n, kv, h, scale, cap, window = len(rows["input_ids"]), 4, 2, 8, 0.35, 3.0, 5
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, T, n, h))
    k, v = (jax.random.normal(key, (b, T, kv, h)) for key in keys[1:3])
    valid = (seg > 0)[..., None, None]  # padding queries give meaningless outputs on both paths
    weight = jax.random.normal(keys[3], (b, T, n, h)) * valid

    def xla(q, k, v):
        mask = make_attention_mask(seg, br, pos, window)
        return attention(q, k, v, mask=mask, scale=scale, logit_softcap=cap)

    mesh = mesh_of(mesh_name)
    order = sequence_parallel.zigzag_order(T, mesh.shape["sequence"])
    back = sequence_parallel.inverse_order(order)
    zig = lambda x: jnp.take(x, order, axis=1)

    def ring(q, k, v):
        out = ring_attention(zig(q), zig(k), zig(v), segment_ids=zig(seg), branch_ids=zig(br),
                             positions=zig(pos), scale=scale, logit_softcap=cap, sliding_window=jnp.int32(window))
        return jnp.take(out, back, axis=1)

    value_and_grads = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * weight), (0, 1, 2)))
    expected_out, (expected_loss, expected_grads) = jax.jit(xla)(q, k, v), value_and_grads(xla)(q, k, v)
    with jax.set_mesh(mesh):
        out, (loss, grads) = jax.jit(ring)(q, k, v), value_and_grads(ring)(q, k, v)
    for layout, rows_of in by_layout.items():
        np.testing.assert_allclose((out * valid)[rows_of], (expected_out * valid)[rows_of], atol=1e-5,
                                   err_msg=layout)
        for name, g, e in zip("qkv", grads, expected_grads):
            np.testing.assert_allclose(g[rows_of], e[rows_of], atol=1e-5, err_msg=f"{layout} d{name}")
    # The loss sums ~10^4 terms of both signs; the sharded sum adds them in another order than the unsharded
    # one, which moves an fp32 sum by a few eps times the sum of |terms| (the outputs are compared above).
    mass = float(np.sum(np.abs(np.asarray(expected_out * weight, np.float64))))
    np.testing.assert_allclose(loss, expected_loss, rtol=0, atol=16 * np.finfo(np.float32).eps * mass)
    assert float(jnp.abs(expected_grads[1]).max()) > 0


def decoder_logprobs(model_config, mesh, batch, *, sequence_parallel_backend):
    """value and grads of sum(pc - pr) with per-pair sums {pc, pr, nc, nr}, as the train step computes."""
    backend = "sequence_parallel" if sequence_parallel_backend else "xla"
    model = Decoder(model_config, attention_backend=backend, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    num_pairs = len(batch["pair_valid"])

    def objective(params, batch):
        sums = pair_logprobs(graphdef, (params,), batch, num_pairs=num_pairs, chunk_size=16)
        return jnp.sum(sums["pc"] - sums["pr"]), sums

    fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    if mesh is None:
        return fn(params, batch)
    shardings = batch_shardings(mesh, list(batch), stacked=False)
    placed = {key: jax.device_put(x, shardings[key]) for key, x in batch.items()}
    with jax.set_mesh(mesh):
        return fn(params, placed)


def outside_ci_unless_slow(*values, in_ci: bool, id=None):
    """A parameter set that CI skips (it runs a covering subset); JAXDPO_SLOW_TESTS=1 runs every one."""
    marks = [pytest.mark.skipif(not in_ci and os.environ.get("JAXDPO_SLOW_TESTS") != "1",
                                reason="outside CI's covering subset; run with JAXDPO_SLOW_TESTS=1")]
    return pytest.param(*values, marks=marks, id=id)


# The window and softcaps are covered op-level on every mesh, so the Gemma-2-like model runs on two meshes.
# CI runs the deepest ring (seq8) and the mixed mesh, every case with JAXDPO_SLOW_TESTS=1.
DECODER_CI_CASES = {("llama", "seq8"), ("llama", "fsdp2-seq2-tensor2"), ("gemma2", "fsdp2-seq2-tensor2")}
DECODER_CASES = [outside_ci_unless_slow(mesh_name, config, in_ci=(family, mesh_name) in DECODER_CI_CASES,
                                        id=f"{family}-{mesh_name}")
                 for family, config, meshes in (("llama", CONFIG, list(MESHES)),
                                                ("gemma2", GEMMA2_LIKE, ["seq2", "fsdp2-seq2-tensor2"]))
                 for mesh_name in meshes]


@pytest.mark.parametrize("mesh_name,model_config", DECODER_CASES)
def test_decoder_pair_logprobs_and_grads_match_whole_rows(mesh_name, model_config):
    batches = layout_batches(num_pairs=8, packed_rows=8)  # 8 pairs, 8+ rows: split over any mesh here
    for layout in ("padded", "packed"):  # prefix_shared rows are already in the attention test
        batch = dict(batches[layout])
        batch["scored_index"] = layouts.scored_index(batch["side"], 16)
        (expected, expected_sums), expected_grads = decoder_logprobs(model_config, None, batch,
                                                                      sequence_parallel_backend=False)
        mesh = mesh_of(mesh_name)
        zig = sequence_parallel.to_zigzag(batch, mesh.shape["sequence"])
        (value, sums), grads = decoder_logprobs(model_config, mesh, zig, sequence_parallel_backend=True)
        for key in ("pc", "pr", "nc", "nr"):
            np.testing.assert_allclose(sums[key], expected_sums[key], atol=1e-5, err_msg=f"{layout} {key}")
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-5)
        leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
        assert len(leaves) == len(expected_leaves) > 8
        for g, e in zip(leaves, expected_leaves):
            np.testing.assert_allclose(g, e, atol=1e-5, err_msg=layout)
        assert float(jnp.abs(expected_grads["layers"]["k_proj"][...]).max()) > 0


def test_mesh_has_a_sequence_axis_between_fsdp_and_tensor():
    mesh = make_mesh(1, 2, 2, sequence=2)
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(make_mesh(1, -1, 1, sequence=4).shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
    with pytest.raises(ValueError, match="data\\*fsdp\\*sequence\\*tensor = 12"):
        make_mesh(1, 3, 2, sequence=2)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.sequence": 0}, "mesh.sequence = 0 must be >= 1"),
    ({"mesh.sequence": 3}, "data.max_length = 128 must be a multiple of 2 * mesh.sequence = 6 "),
    ({"mesh.sequence": 3, "data.layout": "packed", "data.pack_length": 200},
     "data.pack_length = 200 must be a multiple of 2 * mesh.sequence = 6 "),
])
def test_config_rejects_rows_that_do_not_split(overrides, message):
    config = dpo.get_config()
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_bad_sequence_axis_is_one_line_and_exit_2():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "jaxdpo.train", "--config=configs/dpo.py",
                             "--config.mesh.sequence=3"], cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "jaxdpo: data.max_length = 128 must be a multiple of 2 * mesh.sequence = 6 (each of the 3 sequence "
        "shards holds two equal chunks of a row); use 132 or change mesh.sequence"]


# ---------------------------------------------------------------------------------------------
# the real training run (jaxdpo.training.loop.train_and_evaluate) on every sequence mesh: exactly the same steps

TRAIN_KEYS = ("train/loss", "train/grad_norm", "train/rewards/chosen", "train/rewards/margins")


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    from tests.tiny_assets import make_run_assets
    return make_run_assets(str(tmp_path_factory.mktemp("sequence_assets")), n_train=16, n_eval=8)


@pytest.fixture(scope="module")
def trainings(run_assets, tmp_path_factory):
    """train(mesh_name, layout, mode) -> (run, metric records) of 2 steps, memoized."""
    train = memoized_trainings(run_assets, tmp_path_factory)

    def train_on(mesh_name, layout, mode):
        data, fsdp, sequence, tensor = MESHES[mesh_name]
        return train((mesh_name, layout, mode), {
            "data.eval_files": "", "train.export_hf": False, "train.steps": 2, "data.layout": layout,
            "reference.mode": mode, "mesh.data": data, "mesh.fsdp": fsdp, "mesh.sequence": sequence,
            "mesh.tensor": tensor})

    return train_on


# Every (mesh, layout, reference) case is two short training runs (~15-30 s of compiling each on 2 cores):
# CI runs a covering subset (every layout, both references, a 2- and 4-way ring and the mixed mesh; the
# 8-way ring is in the decoder test above), JAXDPO_SLOW_TESTS=1 all of them.
CI_CASES = {("seq2", "padded", "device"), ("seq4", "prefix_shared", "cached"), ("fsdp2-seq2-tensor2", "packed", "cached")}


@pytest.mark.parametrize("mesh_name,layout,mode", [
    outside_ci_unless_slow(m, layout, mode, in_ci=(m, layout, mode) in CI_CASES)
    for m in MESHES if m != "seq1" for layout in layouts.LAYOUTS for mode in ("device", "cached")])
def test_training_steps_match_on_every_sequence_mesh(trainings, mesh_name, layout, mode):
    """Two steps (the second after an update) give the same loss, gradient norm and rewards, and the same
    params, whether rows are whole (sequence = 1) or split 2, 4, 8 ways or over a mixed mesh."""
    run, records = trainings(mesh_name, layout, mode)
    one, one_records = trainings("seq1", layout, mode)
    assert dict(run.mesh.shape)["sequence"] == MESHES[mesh_name][2]
    assert run.policy.graphdef is not None and run.data.row_length % (2 * MESHES[mesh_name][2]) == 0
    for key in TRAIN_KEYS:
        got, want = [r[key] for r in records if key in r], [r[key] for r in one_records if key in r]
        assert len(got) == len(want) == 2, key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=key)
    for got, want in zip(jax.tree.leaves(run.state["params"]), jax.tree.leaves(one.state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
