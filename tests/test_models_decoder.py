"""Decoder behaviour that does not need transformers: remat, the layer hook, the scan, sharding, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import Decoder, families
from jaxdpo.parallel.sharding import make_mesh
from tests.helpers import TINY, gemma2_like

CONFIG = TINY
GEMMA2_LIKE = gemma2_like(CONFIG, sliding_window=3)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)


def loss_and_grads(model):
    graphdef, params = nnx.split(model)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(IDS) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_give_the_same_loss_and_grads():
    results = {}
    for remat in ("none", "full", "dots_saveable"):
        results[remat] = loss_and_grads(Decoder(CONFIG, remat=remat, rngs=nnx.Rngs(0)))
    base_loss, base_grads = results["none"]
    for remat in ("full", "dots_saveable"):
        loss, grads = results[remat]
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(base_grads["layers"]["q_proj"][...]).max()) > 0
    with pytest.raises(ValueError, match="remat must be one of"):
        Decoder(CONFIG, remat="some", rngs=nnx.Rngs(0))


def test_layer_params_hook_runs_inside_the_scan_on_each_layer():
    model = Decoder(CONFIG, rngs=nnx.Rngs(1))
    seen_shapes = []

    def identity(params):
        seen_shapes.append(params["q_proj"].shape)
        return params

    np.testing.assert_allclose(model(IDS, layer_params_hook=identity), model(IDS), atol=1e-6)
    assert seen_shapes == [(32, 4, 8)]  # traced once, per-layer slice (no layers axis): it is the scan body

    def no_residual_branches(params):  # zero the attention and MLP outputs: logits = head(norm(embed))
        return {**params, "o_proj": params["o_proj"] * 0, "down_proj": params["down_proj"] * 0}

    got = model(IDS, layer_params_hook=no_residual_branches)
    x = model.embed[...][IDS]
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + CONFIG.rms_norm_eps) * model.final_norm[...]
    np.testing.assert_allclose(got, normed @ model.lm_head[...], atol=1e-5)


def test_one_scan_whatever_the_depth():
    def count_eqns(num_layers):
        model = Decoder(dataclasses.replace(CONFIG, num_layers=num_layers), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(IDS))(params)
        return len(jaxpr.eqns), str(jaxpr).count("scan[")

    assert count_eqns(2) == count_eqns(8)
    assert count_eqns(2)[1] == 1


def test_sharded_model_under_mesh_matches_unsharded():
    reference = Decoder(GEMMA2_LIKE, rngs=nnx.Rngs(2))(IDS)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        model = Decoder(GEMMA2_LIKE, rngs=nnx.Rngs(2))
        specs = nnx.get_named_sharding(nnx.state(model), mesh)
        assert specs["layers"]["q_proj"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert specs["layers"]["down_proj"].spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
        assert specs["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        assert model.layers.up_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        logits = jax.jit(lambda m, ids: m(ids))(model, IDS)
    np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_bf16_compute_returns_fp32_logits_close_to_fp32():
    fp32 = Decoder(CONFIG, rngs=nnx.Rngs(4))
    bf16 = Decoder(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    assert bf16.layers.q_proj[...].dtype == jnp.float32  # params stay fp32, compute in bf16
    assert bf16.hidden_states(IDS).dtype == jnp.bfloat16
    logits = bf16(IDS)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fp32(IDS), atol=5e-2)


def test_prefix_shared_row_with_sliding_window_uses_positions():
    """Sliding layers measure distance in positions, so the rejected branch (which restarts at the
    prompt's last position) sees the same window as in its own row."""
    model = Decoder(GEMMA2_LIKE, rngs=nnx.Rngs(5))
    prompt, chosen, rejected = [5, 9, 2, 7, 1], [11, 3, 8, 6], [4, 6, 2]
    start = len(prompt) - 1
    shared = prompt[:-1] + [prompt[-1]] + chosen + [prompt[-1]] + rejected
    branch = [0] * start + [1] * (1 + len(chosen)) + [2] * (1 + len(rejected))
    positions = (list(range(start)) + list(range(start, start + 1 + len(chosen)))
                 + list(range(start, start + 1 + len(rejected))))
    row = lambda xs: jnp.asarray([xs], jnp.int32)
    shared_logits = model(row(shared), positions=row(positions), branch_ids=row(branch))[0]
    rejected_logits = model(row(prompt + rejected))[0]
    np.testing.assert_allclose(shared_logits[start + 1 + len(chosen):], rejected_logits[start:], atol=1e-5)


def test_config_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        dataclasses.replace(CONFIG, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="sliding_attention layers but sliding_window is None"):
        dataclasses.replace(CONFIG, layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        families.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 1,
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
