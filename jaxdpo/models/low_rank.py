"""LoRA's adapter math: the update (x A) B added to a base projection, with PEFT's dropout on x and a
hand-written backward that keeps XLA:CPU from copying activations. Pure functions of arrays; the decoder
(jaxdpo.models.decoder) calls `lora_update` for every adapted projection, jaxdpo.models.lora owns the
adapters' parameters, merging and export."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def lora_dropout(x, rate: float, key):
    """PEFT's adapter dropout: each unit of x kept with probability 1 - rate and scaled by 1 / (1 - rate).
    The mask is drawn for x's whole (global) shape from `key`; with jax_threefry_partitionable (the default)
    the values do not depend on how x is sharded, and each device only generates its own rows."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def low_rank(dims: tuple[str, str], x, lora_a, lora_b):
    """(x A) B without dropout: x [B,T,in...], A [in..., r], B [r, out...], `dims` the einsum letters of the
    in and out dims. Its backward (_low_rank_backward) keeps XLA:CPU from transposing activations."""
    ins, outs = dims
    return jnp.einsum(f"btr,r{outs}->bt{outs}", jnp.einsum(f"bt{ins},{ins}r->btr", x, lora_a), lora_b)


def _low_rank_forward(dims, x, lora_a, lora_b):
    ins, outs = dims
    down = jnp.einsum(f"bt{ins},{ins}r->btr", x, lora_a)
    return jnp.einsum(f"btr,r{outs}->bt{outs}", down, lora_b), (x, lora_a, lora_b, down)


def _low_rank_backward(dims, residuals, g):
    """The adapters' gradients contract over the tokens. Written as rank-first products (down^T g, then
    (g B^T)^T x and a transpose of that [r, in] result), the large operands g and x are read as stored;
    autodiff's x^T (g B^T) and down^T g made XLA:CPU write a transposed copy of a [tokens, features]
    activation for each adapter first, the step's largest copies (DEVELOPING.md, Profile)."""
    ins, outs = dims
    x, lora_a, lora_b, down = residuals
    g_down = jnp.einsum(f"bt{outs},r{outs}->btr", g, lora_b)
    d_b = jnp.einsum(f"btr,bt{outs}->r{outs}", down, g)
    d_a = jnp.moveaxis(jnp.einsum(f"btr,bt{ins}->r{ins}", g_down, x), 0, -1)
    return jnp.einsum(f"btr,{ins}r->bt{ins}", g_down, lora_a), d_a, d_b


low_rank.defvjp(_low_rank_forward, _low_rank_backward)


def lora_update(x, lora_a, lora_b, spec: str, *, dropout_rate: float = 0.0, dropout_key=None):
    """(x A) B for the base projection `spec` ("btd,dnh->btnh"): A [in..., r] takes the base weight's input
    dims, B [r, out...] gives its output dims (jaxdpo.models.lora adds them; r is the rank). With a
    `dropout_key` and dropout_rate > 0 it is (dropout(x) A) B."""
    inputs, out_dims = spec.split("->")
    x_dims = inputs.split(",")[0]
    in_dims = x_dims[2:]

    if dropout_key is None or dropout_rate == 0:
        return low_rank((in_dims, out_dims[2:]), x, lora_a, lora_b)

    # Rematerialized: the backward pass regenerates the mask from the key instead of keeping the
    # dropped input, so dropout adds no [B,T,in] activation per adapter (x itself is kept anyway).
    @jax.checkpoint
    def dropped_down_projection(x, lora_a, key):
        return jnp.einsum(f"{x_dims},{in_dims}r->btr", lora_dropout(x, dropout_rate, key), lora_a)

    down = dropped_down_projection(x, lora_a, dropout_key)
    return jnp.einsum(f"btr,r{out_dims[2:]}->{out_dims}", down, lora_b)
