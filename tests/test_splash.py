"""Splash attention (jaxdpo/ops/splash.py) equals the XLA path, run as the real Pallas kernel in interpret mode.

Batches come from the real layout code; T is not a multiple of 128 and head_dim is 16, so the wrapper's
padding of both is exercised too. Tolerances are fp32 (1e-5) on the query rows a loss can read.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.config import ConfigError
from jaxdpo.data.layouts import make_batch
from jaxdpo.models import Decoder, ModelConfig
from jaxdpo.ops import splash
from jaxdpo.ops.attention import attention, make_attention_mask, select_backend
from jaxdpo.ops.logprobs import pair_sums, token_logprobs
from jaxdpo.parallel.sharding import make_mesh

# (prompt, chosen, rejected) lengths; the last pair has a one-token prompt, so its completions see no
# shared tokens: the merged path's cross call is fully masked on those rows.
PAIR_LENGTHS = ((6, 3, 4), (9, 2, 5), (4, 6, 1), (1, 5, 3))
ROW_LENGTH = {"padded": 16, "prefix_shared": 24, "packed": 40}
KERNEL = {"padded": "splash", "prefix_shared": "splash_branches", "packed": "splash_branches"}
SCALE = 0.25


def _pairs(vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(5, vocab, n).astype(np.int32) for n in lengths) for lengths in PAIR_LENGTHS]


def _batch(layout):
    pairs = _pairs()  # make_batch raises if a pair does not fit ROW_LENGTH
    return {k: jnp.asarray(v) for k, v in make_batch(pairs, layout=layout, row_length=ROW_LENGTH[layout],
                                                     num_pairs=len(pairs)).items()}


def _qkv(rows, t, seed=1):
    """GQA: 2 kv heads x 2 query heads each, head_dim 16."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(rows, t, heads, 16)), jnp.float32) for heads in (4, 2, 2))
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    return q, k, v, weights


def _xla(batch, softcap=None):
    mask = make_attention_mask(batch["segment_ids"], batch["branch_ids"], batch["positions"])
    return lambda q, k, v: attention(q, k, v, mask=mask, scale=SCALE, logit_softcap=softcap)


def _splash(batch, layout, softcap=None):
    return lambda q, k, v: attention(q, k, v, scale=SCALE, logit_softcap=softcap, backend=KERNEL[layout],
                                     segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"])


def _masked_sum(fn, weights, valid):
    # padding query rows give meaningless (finite) outputs that no loss reads: leave them out
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights * valid[:, :, None, None])


@pytest.mark.parametrize("layout,softcap", [("padded", None), ("prefix_shared", None), ("packed", 2.0)])
def test_forward_and_gradients_match_xla(layout, softcap):
    batch = _batch(layout)
    q, k, v, weights = _qkv(*batch["segment_ids"].shape)
    valid = (batch["segment_ids"] != 0).astype(jnp.float32)
    want = _xla(batch, softcap)(q, k, v)
    got = jax.jit(_splash(batch, layout, softcap))(q, k, v)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert np.isfinite(np.asarray(got)).all()  # padding rows too
    rows = np.asarray(valid, bool)
    assert np.abs(np.asarray(got - want))[rows].max() <= 1e-5

    want_grads = jax.grad(_masked_sum(_xla(batch, softcap), weights, valid), argnums=(0, 1, 2))(q, k, v)
    got_grads = jax.jit(jax.grad(_masked_sum(_splash(batch, layout, softcap), weights, valid),
                                 argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert float(jnp.abs(w).max()) > 1e-2, name  # the comparison is not between zeros
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_long_packed_rows_span_several_kernel_blocks():
    # T=300 pads to 384 = 3 blocks of 128: causal block skipping, and segments and branches crossing block
    # edges, in the forward and in both backward kernels.
    rng = np.random.default_rng(2)
    pairs = [tuple(rng.integers(5, 60, n).astype(np.int32) for n in lengths)
             for lengths in ((60, 40, 50), (90, 20, 30), (30, 70, 10), (1, 50, 30), (20, 20, 20))]
    batch = {k: jnp.asarray(v) for k, v in make_batch(pairs, layout="packed", row_length=300,
                                                     num_pairs=len(pairs)).items()}
    assert batch["segment_ids"].shape == (2, 300) and int(batch["segment_ids"].max()) >= 3
    q, k, v, weights = _qkv(2, 300)
    valid = (batch["segment_ids"] != 0).astype(jnp.float32)
    want = jax.grad(_masked_sum(_xla(batch), weights, valid), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(_masked_sum(_splash(batch, "packed"), weights, valid), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_mesh_runs_the_kernel_per_shard_with_the_same_numbers():
    layout = "prefix_shared"
    batch = _batch(layout)  # 4 rows: 2 per data x fsdp shard; 2 kv heads: 1 per tensor shard
    q, k, v, weights = _qkv(*batch["segment_ids"].shape)
    valid = (batch["segment_ids"] != 0).astype(jnp.float32)
    loss = _masked_sum(_splash(batch, layout), weights, valid)
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(loss)(q, k, v))
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert "shard_map" in jaxpr and "P(('data', 'fsdp'), None, 'tensor', None)" in jaxpr
    # a sum of ~1e3 fp32 terms added in another order across shards: a few ulps apart
    np.testing.assert_allclose(got_loss, want_loss, rtol=4e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


# -- backend selection -----------------------------------------------------------------------------------
def _select(requested="splash", platform="tpu", layout="padded", dtype=jnp.bfloat16, **kwargs):
    return select_backend(requested, platform=platform, layout=layout, dtype=dtype,
                          **{"head_dim": 64, **kwargs})


def test_select_backend_splash_and_auto():
    assert _select() == ("splash", "requested; causal + segment ids")
    assert _select(dtype=jnp.float32, head_dim=96, logit_softcap=50.0)[0] == "splash"  # head_dim is padded
    for layout in ("prefix_shared", "packed"):
        backend, why = _select(layout=layout)
        assert backend == "splash_branches" and "merged by their logsumexps" in why
    for kwargs, reason in ((dict(platform="cpu"), "TPU kernel (this run is on cpu)"),
                           (dict(dtype=jnp.float16), "float16"),
                           (dict(sliding=True), "sliding-window")):
        backend, why = _select(**kwargs)
        assert backend == "xla" and why.startswith("model.attention=splash falls back") and reason in why

    assert _select("auto")[0] == "splash"
    assert _select("auto", layout="packed")[0] == "splash_branches"
    assert _select("auto", platform="gpu")[0] == "cudnn"
    assert _select("auto", platform="gpu", layout="packed")[0] == "xla"
    backend, why = _select("auto", platform="cpu")
    assert backend == "xla" and "no fused attention kernel on cpu" in why
    assert _select("xla") == ("xla", "requested")
    with pytest.raises(ConfigError, match="model.attention = 'flash'"):
        _select("flash")


def test_branch_layouts_fall_back_when_jax_changes_the_private_backward(monkeypatch):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    def different_bwd(res, do, *, block_sizes):
        raise AssertionError("never called")

    monkeypatch.setattr(splash_attention_kernel, "_splash_attention_bwd", different_bwd)
    splash.merged_backward_problem.cache_clear()
    try:
        backend, why = _select(layout="packed")
        assert backend == "xla" and "differs from the JAX 0.10 signature" in why and "data.layout=padded" in why
        assert _select(layout="padded")[0] == "splash"  # one call, public API only
    finally:
        monkeypatch.undo()
        splash.merged_backward_problem.cache_clear()
    assert splash.merged_backward_problem() is None


# -- the decoder -------------------------------------------------------------------------------------------
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_decoder_pair_logprobs_match_xla(layout):
    batch = _batch(layout)
    config = dataclasses.replace(CONFIG, attn_logit_softcap=3.0) if layout == "padded" else CONFIG
    state = nnx.state(Decoder(config, rngs=nnx.Rngs(0)))

    def pair_logprobs(backend):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, attention_backend=backend, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, state)

        @jax.jit
        def forward(batch):
            hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                         batch["branch_ids"])
            token_lp = token_logprobs(hidden, model.lm_head_weight(), batch["targets"], chunk_size=8)
            return pair_sums(token_lp, batch["pair_index"], batch["side"], len(PAIR_LENGTHS))

        return forward(batch)

    want, got = pair_logprobs("xla"), pair_logprobs(KERNEL[layout])
    assert float(jnp.abs(want["pc"]).min()) > 1.0  # real sums of several tokens' logprobs
    for key in ("pc", "pr"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-6, err_msg=key)
