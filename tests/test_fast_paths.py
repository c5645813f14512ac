"""The step's faster formulations give what the plain ones give: query-blocked causal attention
(ops.attention.causal_blocked_attention) equals full attention on every real query row, values and gradients,
LoRA's low-rank update with its own backward (models.low_rank.low_rank) equals autodiff of (x A) B, so
does a projection with its own backward (ops.linear.linear) equal autodiff of its einsum, and the decode step's
attention over a KV cache (ops.attention.decode_attention) equals grouped_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.models.low_rank import low_rank
from jaxdpo.ops.attention import (
    causal_blocked_attention,
    decode_attention,
    grouped_attention,
    make_attention_mask,
)
from jaxdpo.ops.linear import linear


def prefix_shared_rows(rows: int, t: int):
    """Rows of prompt | chosen | rejected and padding, the branches at varied places."""
    segment_ids, branch_ids = np.zeros((rows, t), np.int32), np.zeros((rows, t), np.int32)
    for r in range(rows):
        prompt, chosen, rejected = 90 + 20 * r, 60 + 7 * r, 40 + 5 * r
        segment_ids[r, :prompt + chosen + rejected] = 1
        branch_ids[r, prompt:prompt + chosen] = 1
        branch_ids[r, prompt + chosen:prompt + chosen + rejected] = 2
    return segment_ids, branch_ids, np.tile(np.arange(t, dtype=np.int32), (rows, 1))


@pytest.mark.parametrize("block", [64, 128])
def test_blocked_attention_equals_full_attention_on_real_rows(block):
    rows, t, heads, kv_heads, head_dim = 3, 300, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (rows, t, heads, head_dim))
    k, v = (jax.random.normal(key, (rows, t, kv_heads, head_dim)) for key in keys[1:3])
    segment_ids, branch_ids, positions = prefix_shared_rows(rows, t)
    mask = make_attention_mask(jnp.asarray(segment_ids), jnp.asarray(branch_ids), jnp.asarray(positions))
    real = jnp.asarray(segment_ids > 0)[:, :, None, None]
    cotangent = jnp.where(real, jax.random.normal(keys[3], q.shape), 0.0)  # padding rows are never read

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v, mask=mask, scale=0.25) * cotangent)

    blocked = lambda q, k, v, **kw: causal_blocked_attention(q, k, v, block=block, **kw)  # noqa: E731
    full_out = grouped_attention(q, k, v, mask=mask, scale=0.25)
    blocked_out = blocked(q, k, v, mask=mask, scale=0.25)
    np.testing.assert_allclose(np.where(real, blocked_out, 0), np.where(real, full_out, 0), rtol=1e-5, atol=1e-6)
    full_grads = jax.grad(loss(grouped_attention), argnums=(0, 1, 2))(q, k, v)
    blocked_grads = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    for full_grad, blocked_grad in zip(full_grads, blocked_grads):
        np.testing.assert_allclose(blocked_grad, full_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, softcap, tolerance", [
    (jnp.float32, None, 1e-6), (jnp.float32, 5.0, 1e-6), (jnp.bfloat16, None, 2e-2)])
def test_decode_attention_equals_grouped_attention(dtype, softcap, tolerance):
    rows, slots, heads, kv_heads, head_dim = 3, 20, 6, 2, 8
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (rows, 1, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (rows, slots, kv_heads, head_dim), dtype) for key in keys[1:])
    visible = np.zeros((rows, 1, 1, slots), bool)  # left padding, then the filled slots, then empty ones
    for row, (first, last) in enumerate([(0, 19), (5, 12), (11, 11)]):
        visible[row, ..., first:last + 1] = True
    expected = grouped_attention(q, k, v, mask=jnp.asarray(visible), scale=0.3, logit_softcap=softcap)
    got = decode_attention(q, jnp.einsum("bskh->bkhs", k), jnp.einsum("bskh->bksh", v), mask=jnp.asarray(visible),
                           scale=0.3, logit_softcap=softcap)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("dims, x_shape, a_shape, b_shape", [
    (("d", "nh"), (2, 5, 8), (8, 3), (3, 4, 2)),  # q_proj: one input dim, (heads, head_dim) out
    (("i", "d"), (2, 5, 8), (8, 3), (3, 6)),  # o_proj after its (heads, head_dim) input is merged
])
def test_low_rank_backward_equals_autodiff(dims, x_shape, a_shape, b_shape):
    keys = jax.random.split(jax.random.key(1), 4)
    x, a, b = (jax.random.normal(key, shape) for key, shape in zip(keys, (x_shape, a_shape, b_shape)))
    ins, outs = dims

    def plain(x, a, b):
        return jnp.einsum(f"btr,r{outs}->bt{outs}", jnp.einsum(f"bt{ins},{ins}r->btr", x, a), b)

    weights = jax.random.normal(keys[3], plain(x, a, b).shape)
    np.testing.assert_allclose(low_rank(dims, x, a, b), plain(x, a, b), rtol=1e-6)
    expected = jax.grad(lambda *args: jnp.sum(plain(*args) * weights), argnums=(0, 1, 2))(x, a, b)
    got = jax.grad(lambda *args: jnp.sum(low_rank(dims, *args) * weights), argnums=(0, 1, 2))(x, a, b)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, y_shape, w_shape", [
    ("btd,dnh->btnh", (2, 5, 8), (8, 3, 4)),  # q_proj
    ("bti,id->btd", (2, 5, 12), (12, 8)),  # o_proj, (heads, head_dim) merged
    ("btf,fd->btd", (2, 5, 6), (6, 8)),  # down_proj
])
def test_linear_backward_equals_autodiff(spec, y_shape, w_shape):
    keys = jax.random.split(jax.random.key(2), 3)
    y, w = jax.random.normal(keys[0], y_shape), jax.random.normal(keys[1], w_shape)
    weights = jax.random.normal(keys[2], jnp.einsum(spec, y, w).shape)

    def loss(product):
        return lambda y, w: jnp.sum(jnp.sin(product(spec, y, w)) * weights)

    np.testing.assert_allclose(linear(spec, y, w), jnp.einsum(spec, y, w), rtol=1e-6)
    expected = jax.grad(loss(jnp.einsum), argnums=(0, 1))(y, w)
    for got, want in zip(jax.grad(loss(linear), argnums=(0, 1))(y, w), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a frozen weight (LoRA's base): only the input's gradient is formed, and it is the same
    np.testing.assert_allclose(jax.grad(loss(linear))(y, w), expected[0], rtol=1e-5, atol=1e-6)
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(loss(linear)))(y, w))
