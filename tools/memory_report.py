"""What a compiled train step holds per device, and where the reference's bytes are (reference_memory.py);
and the params a LoRA run holds per device with its frozen base in fp32, int8 or nf4 (QLoRA), from shapes
alone: `python tools/memory_report.py MODEL_DIR_OR_CONFIG_JSON [--fsdp N] [--tensor N] [--rank R]`.

On CPU (jax 0.10) XLA has one memory: its memory analysis counts pinned_host arguments as ordinary
arguments, and JAX lowers the per-layer host-to-device copies to nothing. The report therefore also
reads the compiled program's own statement of what is in host memory: the entry parameters of memory
space S(5) in its HLO.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

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


def base_bytes_per_device(model_config, mesh, *, base_dtypes=("none", "int8", "nf4"), rank: int = 16,
                          param_dtype=np.float32) -> dict[str, dict[str, int]]:
    """{base_dtype: {"projections": bytes, "params": bytes}} one device holds under LoRA (all-linear, `rank`)
    on `mesh`: the frozen projections (float in `param_dtype`, or codes plus fp32 block scales), and every
    param (projections, embeddings, norms, adapters). Built from shapes; nothing is allocated."""
    from jaxdpo.models.decoder import PROJECTIONS, LoRASettings, adapter_specs, layer_param_specs, top_param_specs
    from jaxdpo.models.lora import quantized_specs
    from jaxdpo.models.quantize import bytes_per_device

    dtype = np.dtype(param_dtype)
    layer = layer_param_specs(model_config)
    others = {name: (*spec, dtype) for name, spec in {**top_param_specs(model_config), **layer}.items()
              if name not in PROJECTIONS}
    out = {}
    for base_dtype in base_dtypes:
        settings = LoRASettings(rank=rank, alpha=float(rank), targets=tuple(PROJECTIONS), base_dtype=base_dtype)
        adapters = {name: (*spec, dtype) for name, spec in adapter_specs(model_config, settings).items()}
        projections = quantized_specs(model_config, settings) or {t: (*layer[t], dtype) for t in PROJECTIONS}
        held = bytes_per_device(projections, mesh)
        out[base_dtype] = {"projections": held,
                           "params": held + bytes_per_device({**others, **adapters}, mesh)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a HF model dir or its config.json (only the shapes are read)")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxdpo.models.hf_io import load_config
    from jaxdpo.parallel.sharding import make_mesh

    model_config = load_config(os.path.dirname(args.model) if args.model.endswith(".json") else args.model)
    mesh = make_mesh(1, args.fsdp, args.tensor, jax.devices()[:args.fsdp * args.tensor])
    report = base_bytes_per_device(model_config, mesh, rank=args.rank)
    fp32 = report["none"]["projections"]
    for entry in report.values():
        entry["projections_vs_fp32"] = round(entry["projections"] / fp32, 4)
    print(json.dumps({"mesh": dict(mesh.shape), "bytes_per_device": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
