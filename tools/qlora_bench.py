"""QLoRA memory per base dtype (`python tools/bench.py --base-dtypes none,int8,nf4 ...`): for each
`lora.base_dtype`, the bytes one device holds of the frozen projections (codes and block scales when
quantized) and of every param (embeddings, norms, adapters included), and XLA's memory analysis of the
compiled LoRA train step (argument, output, temp, generated code; step total = argument + output - aliased
output + temp, as tools/bench.py's compiled_memory_bytes).

The run is configs/dpo.py with LoRA on every projection and reference.mode = device (under LoRA the base with
the adapters off: no copy). The policy, reference and train step come from jaxdpo.training.build, the
functions training calls; the params, optimizer state and batch are only described (jax.ShapeDtypeStruct),
so the step is lowered and compiled but never run and no weight is read: only the model's config.json,
which for a --shape is written here. The batch is --batch-size pairs of --max-length tokens (a prompt of
--max-prompt-length and two completions of the rest) in the first of --layouts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes")


def write_shape_config(shape: dict, out_dir: str) -> str:
    """A model directory holding only the config.json of a tools/bench_assets.py SHAPES entry (no weights)."""
    from jaxdpo.models import ModelConfig
    from jaxdpo.models.families import config_to_hf

    qwen = shape.get("family") == "qwen2"
    config = ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                         num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                         head_dim=shape["hidden"] // shape["heads"], qkv_bias=qwen,
                         tie_word_embeddings=shape.get("tie", False), model_type=shape.get("family", "llama"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    return out_dir


def bench_config(args, model_dir: str, base_dtype: str):
    """configs/dpo.py for this bench: LoRA (--lora-rank, all-linear) over a `base_dtype` base."""
    from configs import dpo

    c = dpo.get_config()
    c.model.path = model_dir
    c.model.dtype = args.dtype
    c.model.param_dtype = args.param_dtype or args.dtype
    c.model.attention = args.attention
    c.model.logprob_chunk = args.chunk
    c.model.remat = args.remat
    c.data.max_length, c.data.max_prompt_length = args.max_length, args.max_prompt_length
    c.data.layout = args.layouts.split(",")[0]
    c.train.batch_size = args.batch_size
    c.train.micro_batch_size = args.micro_batch_size or args.batch_size
    c.train.eval_batch_size = c.train.micro_batch_size
    c.train.steps = 1
    c.reference.mode = "device"
    c.lora.rank, c.lora.alpha, c.lora.targets = args.lora_rank, float(args.lora_rank), "all-linear"
    c.lora.base_dtype = base_dtype
    c.mesh.fsdp, c.mesh.tensor = args.fsdp, args.tensor
    return c


def longest_pairs(config, vocab: int):
    """One step's pairs, each as long as the data config allows: a prompt of max_prompt_length tokens and
    two completions that fill max_length (random ids; only their count shapes the step)."""
    rng = np.random.default_rng(0)
    prompt = config.data.max_prompt_length
    completion = config.data.max_length - prompt
    return [tuple(rng.integers(3, vocab, n) for n in (prompt, completion, completion))
            for _ in range(config.train.batch_size)]


def synthetic_data(config, mesh, vocab: int):
    """build.Data over longest_pairs, batched as build_data would batch them."""
    from jaxdpo.data.batcher import PairBatcher
    from jaxdpo.data.layouts import row_length
    from jaxdpo.training import build

    pairs = longest_pairs(config, vocab)
    row_multiple = build.rows_per_process_multiple(config, mesh)
    length = row_length(pairs, config.data.layout, config.data, sequence=config.mesh.sequence)
    batcher = PairBatcher(pairs, layout=config.data.layout, row_length=length, batch_size=config.train.batch_size,
                          micro_batch_size=config.train.micro_batch_size, seed=0, shuffle=False,
                          row_multiple=row_multiple)
    return build.Data(tokenizer=None, train_pairs=pairs, eval_pairs=None, report={}, row_length=length,
                      row_multiple=row_multiple, pad_id=0, batcher=batcher, eval_batcher=None, total_steps=1)


def described_batch(data, reference, shardings: dict) -> dict:
    """Step 0's batch as the train step takes it ([A, ...] stacked micro-batches), described, not placed."""
    import jax

    from jaxdpo.training.batches import stack_micro_batches

    local = stack_micro_batches([reference.attach("train", m) for m in data.batcher.train_batch(0)])
    return {k: jax.ShapeDtypeStruct(local[k].shape, local[k].dtype, sharding=s) for k, s in shardings.items()}


def bytes_per_device(tree) -> int:
    """Bytes of one device's shards of the described arrays in `tree` (the largest shard of each)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def frozen_projections(frozen) -> dict:
    """The frozen weights (or codes and scales) of the LoRA target projections, by name."""
    from flax import nnx

    from jaxdpo.models.decoder import PROJECTIONS

    layers = nnx.to_pure_dict(frozen)["layers"]
    return {name: x for name, x in layers.items() if name.removesuffix("_codes").removesuffix("_scales") in PROJECTIONS}


def base_dtype_row(config, mesh) -> dict:
    """One base dtype's bytes per device and the compiled train step's memory analysis."""
    import jax

    from jaxdpo.training import build

    policy = build.describe_policy(config, mesh)
    data = synthetic_data(config, mesh, policy.model_config.vocab_size)
    reference = build.build_reference(config, mesh, policy, data)
    steps = build.build_steps(config, mesh, policy, reference, data)
    state = build.train_state(policy, steps, resuming=True)  # described: nothing is allocated
    batch = described_batch(data, reference, steps.train_batch_shardings)
    compiled = steps.train_step.lower(state, policy.frozen, reference.params, batch).compile()
    analysis = compiled.memory_analysis()
    rows = jax.tree.leaves(batch)[0].shape
    memory = {name: int(getattr(analysis, name)) for name in MEMORY_FIELDS}
    return {"base_dtype": config.lora.base_dtype, "reference": reference.mode,
            "projection_bytes": bytes_per_device(frozen_projections(policy.frozen)),
            "frozen_bytes": bytes_per_device(policy.frozen),
            "param_bytes": bytes_per_device((policy.params, policy.frozen)),
            "state_bytes": bytes_per_device(state), "batch_bytes": bytes_per_device(batch),
            "micro_batches": rows[0], "rows": rows[1], "row_length": rows[2],
            "memory_analysis": memory, "compiled_bytes": compiled_total(memory)}


def compiled_total(memory: dict) -> int:
    """What the step needs at once: its arguments, outputs not written over a donated argument, and temps."""
    return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
            + memory["temp_size_in_bytes"])


def run(args, model_dir: str) -> dict:
    """Every --base-dtypes row on a (--fsdp, --tensor) mesh, with projection ratios to the float base."""
    import jax

    from jaxdpo.training import build

    configs = [bench_config(args, model_dir, base_dtype) for base_dtype in args.base_dtypes.split(",")]
    mesh = build.make_mesh(configs[0], jax.devices()[:args.fsdp * args.tensor])
    for config in configs:  # every bad value before the first compile
        build.check_config(config, mesh)
    rows = [base_dtype_row(config, mesh) for config in configs]
    float_bytes = next((r["projection_bytes"] for r in rows if r["base_dtype"] == "none"), None)
    for r in rows:
        r["projections_vs_float"] = r["projection_bytes"] / float_bytes if float_bytes else None
    return {"model": model_dir, "mesh": dict(mesh.shape), "rows": rows}


def table(report: dict) -> str:
    """The rows as a Markdown table, MiB per device."""
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    first = report["rows"][0]
    caption = (f"mesh {report['mesh']}; step of {first['micro_batches']} x {first['rows']} rows x "
               f"{first['row_length']} tokens; MiB per device")
    lines = [caption,
             "| base dtype | projections | x float | all params | argument | output | temp | code | step total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        m = r["memory_analysis"]
        ratio = f"{r['projections_vs_float']:.4f}" if r["projections_vs_float"] else "-"
        lines.append(f"| {r['base_dtype']} | {mib(r['projection_bytes'])} | {ratio} | {mib(r['param_bytes'])} | "
                     f"{mib(m['argument_size_in_bytes'])} | {mib(m['output_size_in_bytes'])} | "
                     f"{mib(m['temp_size_in_bytes'])} | {mib(m['generated_code_size_in_bytes'])} | "
                     f"{mib(r['compiled_bytes'])} |")
    return "\n".join(lines)


def bench(args, shapes: dict) -> dict:
    """tools/bench.py --base-dtypes: the table for --model (its config.json) or --shape (a `shapes` entry),
    printed and returned; a bad model or mesh is one line and exit status 2."""
    from jaxdpo.errors import ConfigError
    from tools import sequence_bench

    devices = args.fsdp * args.tensor
    if devices > 1 and "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        sequence_bench.simulated_devices_flags(os.environ, devices)
    model_dir = args.model or write_shape_config(shapes[args.shape], tempfile.mkdtemp(prefix="jaxdpo_qlora_"))
    try:
        report = run(args, model_dir)
    except ConfigError as error:
        print(f"tools/bench.py --base-dtypes: {error}", file=sys.stderr)
        sys.exit(2)
    print(table(report))
    return report
