"""Mesh, the one table of logical-axis rules, and partition specs.

Every array in jaxdpo is described by logical axis names ("embed", "mlp", "batch", ...). This module
is the only place that says which mesh axis each name lands on, so changing a parallelism strategy is
an edit to `LOGICAL_AXIS_RULES`, never a hunt through model code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdpo.errors import ConfigError

# Outer to inner: `tensor` talks most (every matmul), so its devices are adjacent (one NVLink island / ICI
# neighbours); `sequence` passes K/V to its ring neighbour every layer, next; `fsdp` gathers each layer's
# params once per pass; `data` only reduces gradients once per step.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # rows of a batch: data-parallel and FSDP both split it
    "seq": "sequence",  # the token dimension of activations and row arrays (context parallelism)
    "vocab": "tensor",
    "embed": "fsdp",  # the model dimension: where FSDP (ZeRO-3) shards params and optimizer state
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,  # the stacked-layer axis of the scan
    "norm": None,
}


def logical_to_mesh_axes(names: Sequence[str | None]) -> tuple:
    """("embed", "mlp") -> ("fsdp", "tensor") via LOGICAL_AXIS_RULES."""
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in jaxdpo.parallel.sharding.LOGICAL_AXIS_RULES")
        else:
            out.append(LOGICAL_AXIS_RULES[name])
    return tuple(out)


def logical_spec(*names: str | None) -> P:
    return P(*logical_to_mesh_axes(names))


def named_sharding(mesh: Mesh, *names: str | None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(*names))


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int,
                       sequence: int = 1) -> tuple[int, int, int, int]:
    """(data, fsdp, sequence, tensor) in MESH_AXES order, the single -1 (if any) filled in so that their
    product is num_devices; errors say what to change."""
    names = ("data", "fsdp", "sequence", "tensor")
    sizes = [data, fsdp, sequence, tensor]
    shown = "data, fsdp, sequence, tensor" if sequence != 1 else "data, fsdp, tensor"
    given = tuple(sizes) if sequence != 1 else (data, fsdp, tensor)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of {shown.replace(', ', '/')} may be -1, got {given}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {given}")
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split with fixed axes of product {known} "
                f"({shown} = {given})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        product = "*".join(n for n in names if n != "sequence" or sequence != 1)
        keys = "/".join(f"mesh.{n}" for n in names if n != "sequence" or sequence != 1)
        raise ValueError(
            f"mesh: {product} = {math.prod(sizes)} but {num_devices} devices are available; "
            f"set {keys} so their product is {num_devices} (or use -1 for one of them)")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None, *,
              sequence: int = 1) -> Mesh:
    """A (data, fsdp, sequence, tensor) mesh with Auto axes (Explicit axes break the gathers FSDP relies
    on). `sequence` splits each row's tokens (jaxdpo.ops.ring_attention); 1 = whole rows per device."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), sequence=sequence)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def check_mesh_config(mesh_cfg) -> None:
    """The `mesh` section alone (whether it fits the devices is `make_mesh`'s check)."""
    for axis in ("data", "sequence", "tensor"):
        if mesh_cfg[axis] < 1:
            raise ConfigError(f"mesh.{axis} = {mesh_cfg[axis]} must be >= 1")
    if mesh_cfg.fsdp < 1 and mesh_cfg.fsdp != -1:
        raise ConfigError(f"mesh.fsdp = {mesh_cfg.fsdp} must be >= 1, or -1 for all remaining devices")


def traced_in(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the context (abstract) mesh, whoever calls the jitted result: ring
    attention (the `sequence` axis) reads the mesh from the context, and without one would treat split
    rows as whole ones."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def batch_axis_size(mesh: Mesh) -> int:
    """How many ways the batch rows are split: rows per step must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def sequence_axis_size(mesh: Mesh) -> int:
    """How many ways each row's tokens are split (1 on a mesh without a sequence axis)."""
    return dict(mesh.shape).get("sequence", 1)


def shard_axes(mesh, logical: str, size: int) -> tuple[str, ...] | None:
    """Mesh axes of a logical name that exist in `mesh` with more than one device and split `size` evenly
    (for shard_map specs); None = not split."""
    axes = LOGICAL_AXIS_RULES[logical]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def mesh_axes_size(mesh_shape: dict[str, int], axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    return math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_params_divisible(param_specs: dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]],
                           mesh_shape: dict[str, int]) -> None:
    """Every sharded dimension of every param must split evenly over its mesh axes (no padded shards).

    `param_specs` is name -> (shape, logical axes), as `jaxdpo.models.decoder.*_param_specs` give them;
    raises ConfigError naming each offending size (heads, kv_heads, intermediate, vocab vs mesh.tensor;
    hidden vs mesh.fsdp) before anything is loaded or compiled."""

    problems: dict[tuple[str, int, str], list[str]] = {}
    for name, (shape, logical) in param_specs.items():
        for size, axis_name in zip(shape, logical):
            if axis_name is None:
                continue
            axes = LOGICAL_AXIS_RULES[axis_name]
            ways = mesh_axes_size(mesh_shape, axes)
            if size % ways:
                axes_text = "*".join(f"mesh.{a}" for a in ((axes,) if isinstance(axes, str) else axes))
                problems.setdefault((axis_name, size, f"{axes_text} = {ways}"), []).append(name)
    if problems:
        lines = [f"  {axis_name} size {size} is not divisible by {axes_text} (params: {', '.join(names)})"
                 for (axis_name, size, axes_text), names in problems.items()]
        raise ConfigError(
            f"mesh {dict(mesh_shape)} does not fit the model: sharded sizes must divide evenly:\n"
            + "\n".join(lines)
            + "\nchoose mesh.tensor to divide heads, kv_heads, intermediate size and vocab, and mesh.fsdp "
              "to divide the hidden size (or move devices to mesh.data)")


def optimizer_state_shardings(optimizer, params, replicated: NamedSharding):
    """Shardings for `optimizer.init(params)`: every param-shaped moment sharded like its param (ZeRO-3),
    counters replicated. Without this, jit places the zeros optax creates replicated on every device."""
    import optax

    abstract = jax.eval_shape(optimizer.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def gather_to_host(x) -> np.ndarray:
    """The whole of a (maybe sharded, maybe multi-host) array as numpy; every process must call it."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
