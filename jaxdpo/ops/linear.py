"""A linear projection y W whose backward reads its large operands as stored.

Autodiff of `einsum("btd,df->btf", y, w)` forms the weight gradient as a product over the tokens followed by a
transpose of its result; XLA:CPU folds that transpose into the product's operand and writes a transposed
copy of the `[tokens, features]` cotangent first, fused with whatever produced it (the SiLU backward, for
gate_proj), the slowest writes of a full fine-tuning step (DEVELOPING.md, Profile). Here the weight gradient
is `einsum("btd,btf->df", y, g)`, whose output dims come out in the weight's order, so no transpose is
asked for. Each gradient is formed only for an input that is differentiated: under LoRA the frozen base
weight gets none, and y is then not kept for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear(spec: str, y, w):
    """einsum(spec, y, w) for a projection spec ("btd,dnh->btnh": y's last letters are contracted with w's
    first, w's other letters are the output's last)."""
    return jnp.einsum(spec, y, w)


def _linear_forward(spec, y, w):
    # Keep y only for w's gradient and w only for y's.
    return jnp.einsum(spec, y.value, w.value), (y.value if w.perturbed else None, w.value if y.perturbed else None)


def _linear_backward(spec, residuals, g):
    y, w = residuals
    lhs, rhs, out = _operands(spec)
    y_grad = None if w is None else jnp.einsum(f"{out},{rhs}->{lhs}", g, w)
    w_grad = None if y is None else jnp.einsum(f"{lhs},{out}->{rhs}", y, g)
    return y_grad, w_grad


linear.defvjp(_linear_forward, _linear_backward, symbolic_zeros=True)
