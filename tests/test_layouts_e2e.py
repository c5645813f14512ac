"""The same tiny training gives the same losses whichever layout carries the pairs."""

import jax
import numpy as np
import pytest

from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from tests.tiny_assets import tiny_run_config


def run(assets, workdir, **overrides):
    cfg = tiny_run_config(assets, str(workdir), **{"train.eval_every": 3, "train.export_hf": False, **overrides})
    trainer = train_and_evaluate(cfg, devices=jax.devices()[:2])
    records = read_metrics(str(workdir))
    return trainer, {key: [r[key] for r in records if key in r]
                     for key in ("train/loss", "train/grad_norm", "train/rewards/chosen", "eval/loss",
                                 "eval/rewards/margins")}


def test_losses_agree_across_layouts(assets, tmp_path):
    results = {layout: run(assets, tmp_path / layout, **{"data.layout": layout})[1]
               for layout in ("padded", "prefix_shared", "packed")}
    base = results["padded"]
    assert len(base["train/loss"]) == 3 and len(base["eval/loss"]) == 2
    assert base["train/loss"][-1] < base["train/loss"][0]  # it trains, so the comparison means something
    for layout in ("prefix_shared", "packed"):
        for key, values in base.items():
            np.testing.assert_allclose(results[layout][key], values, atol=1e-5, rtol=1e-5,
                                       err_msg=f"{layout} vs padded: {key}")


# -- FLOPs ------------------------------------------------------------------------------------------
def _pairs():
    rng = np.random.default_rng(0)
    return [(rng.integers(5, 50, n).astype(np.int32), rng.integers(5, 50, c).astype(np.int32),
             rng.integers(5, 50, r).astype(np.int32)) for n, c, r in ((6, 3, 4), (9, 2, 5), (4, 6, 1))]


def test_flops_count_real_tokens_and_mask_density():
    from jaxdpo.data.layouts import make_batch
    from jaxdpo.models import ModelConfig
    from jaxdpo.training import flops

    cfg = ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=4)
    # per layer: q,o 2*16*16 + k,v 2*16*8 + mlp 3*16*32; LM head 16*100
    assert flops.matmul_params(cfg) == 2 * (512 + 256 + 1536) + 1600
    pairs = _pairs()
    padded = make_batch(pairs, layout="padded", row_length=16, num_pairs=4)
    shared = make_batch(pairs, layout="prefix_shared", row_length=24, num_pairs=4)
    # padded: each row is one causal sequence of n+c (or n+r) tokens: n(n+1)/2 visible pairs
    rows = [n + c for n, c, _ in ((6, 3, 4), (9, 2, 5), (4, 6, 1))] + [n + r for n, _, r in ((6, 3, 4), (9, 2, 5), (4, 6, 1))]
    assert flops.visible_pairs(padded["segment_ids"], padded["branch_ids"]) == sum(k * (k + 1) // 2 for k in rows)
    # prefix_shared: prompt[:-1] (h tokens) then two branches of b1, b2 tokens that see the prompt, not each other
    expected = 0
    for n, c, r in ((6, 3, 4), (9, 2, 5), (4, 6, 1)):
        h, b1, b2 = n - 1, c + 1, r + 1
        expected += h * (h + 1) // 2 + sum(h + i + 1 for i in range(b1)) + sum(h + i + 1 for i in range(b2))
    assert flops.visible_pairs(shared["segment_ids"], shared["branch_ids"]) == expected

    f_padded = flops.step_flops(cfg, [padded], reference_forward=True)
    f_shared = flops.step_flops(cfg, [shared], reference_forward=False)
    assert f_padded["tokens"] == sum(rows) and f_shared["tokens"] == sum(n + c + r + 1 for n, c, r in
                                                                           ((6, 3, 4), (9, 2, 5), (4, 6, 1)))
    forward = flops.forward_flops(cfg, padded)["forward"]
    assert f_padded["total"] == pytest.approx(4 * forward) and f_padded["pairs"] == 3
    assert f_shared["per_pair"] < f_padded["per_pair"]  # prompts once, no reference forward
    assert flops.mfu(5e9, 1e10) == 0.5 and flops.mfu(1.0, None) is None


# -- attention backend dispatch (cuDNN itself needs a GPU; here: the choice and its mask semantics) --
def test_cudnn_backend_is_chosen_only_where_the_mask_allows():
    import jax.numpy as jnp

    from jaxdpo.config import ConfigError
    from jaxdpo.ops.attention import select_backend

    ok = dict(platform="gpu", layout="padded", dtype=jnp.bfloat16, head_dim=128)
    assert select_backend("cudnn", **ok)[0] == "cudnn"
    assert select_backend("xla", **ok) == ("xla", "requested")
    for change, words in (({"platform": "cpu"}, "NVIDIA GPU"), ({"layout": "packed"}, "segment/branch"),
                          ({"dtype": jnp.float32}, "float32"), ({"head_dim": 100}, "head_dim=100"),
                          ({"logit_softcap": 50.0}, "softcap"), ({"sliding": True}, "sliding")):
        backend, why = select_backend("cudnn", **{**ok, **change})
        assert backend == "xla" and words in why and why.startswith("model.attention=cudnn falls back")
    backend, why = select_backend("splash", **ok)  # a TPU kernel: on a GPU it falls back, saying why
    assert backend == "xla" and "TPU" in why
    with pytest.raises(ConfigError, match="flash"):
        select_backend("flash", **ok)


def test_padded_layout_mask_is_causal_plus_padding():
    """What the cuDNN path computes (causal over each row's length) is the padded layout's mask, checked
    with jax.nn.dot_product_attention's XLA implementation given the same lengths."""
    import jax.numpy as jnp

    from jaxdpo.data.layouts import make_batch
    from jaxdpo.ops.attention import attention, make_attention_mask, padding_lengths

    batch = make_batch(_pairs(), layout="padded", row_length=16, num_pairs=3)
    mask = make_attention_mask(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["branch_ids"]),
                               jnp.asarray(batch["positions"]))
    lengths = padding_lengths(jnp.asarray(batch["segment_ids"]))
    t = jnp.arange(16)
    causal_padding = (t[:, None] >= t[None, :]) & (t[None, None, :] < lengths[:, None, None]) \
        & (t[None, :, None] < lengths[:, None, None])
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), np.asarray(causal_padding))

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(6, 16, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(6, 16, 2, 8)), jnp.float32) for _ in range(2))
    ours = attention(q, k, v, mask=mask, scale=8 ** -0.5)
    fused_semantics = jax.nn.dot_product_attention(q, k, v, scale=8 ** -0.5, is_causal=True,
                                                   query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                                   implementation="xla")
    valid = np.asarray(batch["segment_ids"]) != 0
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(fused_semantics)[valid], atol=1e-5)
