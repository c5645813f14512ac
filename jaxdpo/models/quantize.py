"""Frozen base weights stored quantized (QLoRA): `lora.base_dtype` = int8 or nf4.

Each targeted projection W (stacked [layers, in..., out...]) is cut into blocks of BLOCK_SIZE consecutive
elements along its last contracted (input) dim; every block keeps one float32 scale, its absmax (the
scales are not themselves quantized: QLoRA's "double quantization" would save 0.37 bits per weight more).

  int8  codes = round(127 * w / absmax) as int8: w ~ codes * absmax / 127
  nf4   codes = the nearest of the 16 NormalFloat-4 values (NF4_VALUES, bitsandbytes' table) to w / absmax,
        two codes per uint8 byte along the block dim (the first in the high nibble, as bitsandbytes packs)

Both are kept as two arrays named `{target}_codes` and `{target}_scales` beside the adapters, with the
weight's own logical axes (so the usual sharding rules place them); the forward dequantizes one layer's
weight at a time inside the layer scan (`dequantize`). Quantizing is deterministic (round half to even,
ties between NF4 values go to the lower one, as bitsandbytes' decision tree sends them) and happens when
the checkpoint is loaded, so checkpoints hold the adapters only and a resume rebuilds the same codes.

Why not qwix (0.1.8): its PTQ provider finds a weight by looking for an `nnx.Param` attribute of the module
whose method is running (`flax_util.find_param`); our decoder's weights are stacked on a `LayerStack` and
reach the einsum as per-layer slices of a `lax.scan`, so qwix finds no param, treats the weight as an
activation and leaves it in float (DEVELOPING.md, QLoRA, has the reproduction).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxdpo.errors import ConfigError
from jaxdpo.parallel.sharding import logical_spec

BLOCK_SIZE = 64
BASE_DTYPES = ("none", "int8", "nf4")
# The 16 NF4 values as bitsandbytes ships them (QLoRA, Dettmers et al. 2023, appendix E).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], np.float32)
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2


class QuantizedBase(nnx.Variable):
    """Codes or block scales of a frozen quantized projection: never trained, never checkpointed."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One storage format: how many codes share a byte and the codes' dtype."""
    name: str
    codes_per_byte: int
    code_dtype: np.dtype


INT8 = Format("int8", 1, np.dtype(np.int8))
NF4 = Format("nf4", 2, np.dtype(np.uint8))
FORMATS = {f.name: f for f in (INT8, NF4)}
_BY_CODE_DTYPE = {f.code_dtype: f for f in FORMATS.values()}


def format_named(base_dtype: str) -> Format | None:
    """The format of a `lora.base_dtype` value (None for "none"); ConfigError for an unknown one."""
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"lora.base_dtype = {base_dtype!r} is not one of {', '.join(BASE_DTYPES)} "
                          f"(the storage of the frozen base weights under LoRA)")
    return FORMATS.get(base_dtype)


# ---- the codec: pure functions of one array; `axis` is the blocked (contracted) dim -------------------

def _blocked(x, axis: int):
    """x with `axis` cut into [blocks, BLOCK_SIZE] (axis is then the blocks' axis, axis + 1 the block's)."""
    axis = axis % x.ndim
    return x.reshape(*x.shape[:axis], x.shape[axis] // BLOCK_SIZE, BLOCK_SIZE, *x.shape[axis + 1:]), axis


def quantize(w, fmt: Format, axis: int):
    """w (float) -> (codes, float32 absmax scales with w's shape, `axis` divided by BLOCK_SIZE)."""
    blocks, axis = _blocked(jnp.asarray(w, jnp.float32), axis)
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)
    if fmt is INT8:
        codes = jnp.round(normed * 127).astype(jnp.int8)
    else:
        index = jnp.sum(normed[..., None] > jnp.asarray(_NF4_MIDPOINTS), axis=-1).astype(jnp.uint8)
        pairs = index.reshape(*index.shape[:axis + 1], BLOCK_SIZE // 2, 2, *index.shape[axis + 2:])
        high, low = jnp.take(pairs, 0, axis=axis + 2), jnp.take(pairs, 1, axis=axis + 2)
        codes = (high << 4) | low
    unblock = lambda x: x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])  # noqa: E731
    return unblock(codes), jnp.squeeze(absmax, axis + 1)


def dequantize(codes, scales, axis: int, dtype):
    """(codes, scales) -> the weight in `dtype` (products in float32); the format is the codes' dtype."""
    fmt = _BY_CODE_DTYPE[np.dtype(codes.dtype)]
    axis = axis % codes.ndim
    if fmt is INT8:
        values = codes.astype(jnp.float32) / 127
    else:
        nibbles = jnp.stack([codes >> 4, codes & 15], axis=axis + 1)
        nibbles = nibbles.reshape(*codes.shape[:axis], -1, *codes.shape[axis + 1:])
        values = jnp.take(jnp.asarray(NF4_VALUES), nibbles.astype(jnp.int32))
    blocks, axis = _blocked(values, axis)
    weight = blocks * jnp.expand_dims(scales.astype(jnp.float32), axis + 1)
    return weight.reshape(values.shape).astype(dtype)


# ---- shapes and placement --------------------------------------------------------------------------------

def stored_specs(name: str, shape: tuple, logical: tuple, fmt: Format, axis: int) -> dict:
    """`{name}_codes` / `{name}_scales` -> (shape, logical axes, dtype) of a weight stored in `fmt`."""
    axis = axis % len(shape)
    with_size = lambda size: (*shape[:axis], size, *shape[axis + 1:])  # noqa: E731
    return {f"{name}_codes": (with_size(shape[axis] // fmt.codes_per_byte), logical, fmt.code_dtype),
            f"{name}_scales": (with_size(shape[axis] // BLOCK_SIZE), logical, np.dtype(np.float32))}


def check_blocks(weight_specs: dict, axes: dict, base_dtype: str) -> None:
    """ConfigError when a targeted projection's contracted size is not a multiple of BLOCK_SIZE."""
    bad = [f"{name} ({shape[axes[name]]})" for name, (shape, _) in weight_specs.items()
           if shape[axes[name]] % BLOCK_SIZE]
    if bad:
        raise ConfigError(f"lora.base_dtype = {base_dtype}: quantization blocks of {BLOCK_SIZE} along the contracted "
                          f"dim need sizes that divide by {BLOCK_SIZE}, and {', '.join(bad)} do not; use "
                          f"lora.base_dtype = none or leave those projections out of lora.targets")


def quantize_placed(w: jax.Array, fmt: Format, axis: int, logical: tuple, mesh):
    """A placed float weight -> its (codes, scales), each placed with the weight's logical axes on `mesh`."""
    placed = None if mesh is None else NamedSharding(mesh, logical_spec(*logical))
    return jax.jit(quantize, static_argnums=(1, 2), out_shardings=(placed, placed))(w, fmt, axis)


def bytes_per_device(specs: dict, mesh) -> int:
    """Bytes of the largest shard of arrays described as name -> (shape, logical axes, dtype) on `mesh`."""
    total = 0
    for shape, logical, dtype in specs.values():
        shard = NamedSharding(mesh, logical_spec(*logical)).shard_shape(shape)
        total += math.prod(shard) * np.dtype(dtype).itemsize
    return total
