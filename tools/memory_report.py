"""What a compiled train step holds per device, and where the reference's bytes are (reference_memory.py).

On CPU (jax 0.10) XLA has one memory: its memory analysis counts pinned_host arguments as ordinary
arguments, and JAX lowers the per-layer host-to-device copies to nothing. The report therefore also
reads the compiled program's own statement of what is in host memory: the entry parameters of memory
space S(5) in its HLO.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def per_device_bytes(tree, shardings) -> dict[str, int]:
    """{memory kind: bytes one device holds} for arrays (or ShapeDtypeStructs) placed by `shardings`."""
    out: dict[str, int] = {}
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape)
        kind = s.memory_kind or "device"
        out[kind] = out.get(kind, 0) + int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return out


def reference_memory_report(train_step, state, frozen, reference_params, batch, *, mode: str,
                            streams_layers: bool) -> dict:
    """Per-device memory of the compiled `train_step(state, frozen, reference_params, batch)`: XLA's
    memory analysis plus where the reference's bytes (`reference_params`, of reference mode `mode`) are.

    `reference_device_bytes` is what the reference holds in device memory for the whole step;
    `reference_streamed_bytes` is what a reference that `streams_layers` (host mode) copies in during a
    reference forward and frees again (the non-layer params plus one layer): the largest the reference
    ever gets on the device."""
    compiled = train_step.lower(state, frozen, reference_params, batch).compile()
    stats = compiled.memory_analysis()
    analysis = {name: int(getattr(stats, name)) for name in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
        "host_argument_size_in_bytes", "host_temp_size_in_bytes")} if stats is not None else {}
    ref = reference_params
    ref_shardings = jax.tree.map(lambda x: x.sharding, ref)
    by_kind = per_device_bytes(ref, ref_shardings)
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ref["layers"])
    one_layer_shardings = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])),
                                       ref_shardings["layers"])
    non_layer = [k for k in ref.keys() if k != "layers"]
    streamed = sum(per_device_bytes(one_layer, one_layer_shardings).values()) + sum(
        sum(per_device_bytes(ref[k], ref_shardings[k]).values()) for k in non_layer)
    return {
        "mode": mode,
        "memory_analysis": analysis,
        "reference_bytes_by_memory_kind": by_kind,
        "reference_device_bytes": by_kind.get("device", 0),
        "reference_host_bytes": by_kind.get("pinned_host", 0),
        "reference_streamed_bytes": streamed if streams_layers else 0,
        **_host_params_in_hlo(compiled.as_text()),
    }


_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                 "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_HOST_PARAM = re.compile(r"(\w+)\[([\d,]*)\]\{[^{}]*:S\(5\)\}")  # f32[8,64,256]{2,1,0:S(5)}


def _host_params_in_hlo(hlo_text: str) -> dict[str, int]:
    """The entry parameters XLA compiled into host memory (memory space 5) and their per-device bytes.

    XLA:CPU's memory analysis counts them in argument_size_in_bytes (it has one memory), so this is
    the compiled program's own statement of what is not in device memory."""
    layout = next((line for line in hlo_text.splitlines() if "entry_computation_layout=" in line), "")
    params = layout.split("entry_computation_layout={(", 1)[-1].split(")->", 1)[0]
    found = _HOST_PARAM.findall(params)
    size = sum(_HLO_ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])) for dtype, dims in found)
    return {"hlo_host_params": len(found), "hlo_host_param_bytes": size}
