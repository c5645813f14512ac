"""Benchmark DPO training steps: compile time, step time, pairs/s, tokens/s, memory, FLOPs and MFU.

    python tools/bench.py --shape llama-20m --steps 5 --layouts padded,prefix_shared,packed --vs-trl \
        --json /tmp/bench.json
    python tools/bench.py --memory-vocab 150000        # compiled memory vs sequence length, big vocab
    # context parallelism on 8 simulated devices: per-device memory, step time, longest row in a budget
    python tools/bench.py --shape llama-tiny --sequence 1,2,4,8 --max-length 32768 --budget-mib 1024
    python tools/bench.py --generate --model ckpt/smollm2-135m-instruct   # decode tokens/s vs transformers
    # QLoRA: params per device and the compiled LoRA train step's memory with a float, int8 and nf4 base
    python tools/bench.py --base-dtypes none,int8,nf4 --shape qwen2.5-0.5b --max-length 512 --max-prompt-length 256
    # a group of 4 answers in one shared row (loss.group=all_pairs) vs its 6 pairs as prefix_shared rows
    python tools/bench.py --shape llama-20m --groups 4 --batch-size 2 --prompt-len 300 --completion-len 100 \
        --jitter 0.1 --max-length 512 --max-prompt-length 384
    # MFU on one GPU: a Qwen2.5-0.5B-shaped model, rows of 2048 tokens, bf16 compute, cuDNN attention
    python tools/bench.py --shape qwen2.5-0.5b --max-length 2048 --max-prompt-length 1536 --prompt-len 1200 \
        --completion-len 400 --batch-size 16 --layouts padded,packed --dtype bfloat16 --param-dtype float32 \
        --attention cudnn --remat full --json bench_gpu.json

The model is a randomly initialized Llama of the given shape, written once in Hugging Face format, so
that jaxdpo and TRL (--vs-trl) train the very same weights. Data is synthetic (word tokens "w<i>", one
token each, prompt/completion lengths drawn around the given means) or a JSONL file (--data) of
prompt/chosen/rejected strings. Every layout and TRL run the same pairs in the same order.

Figures: compile = lowering + compiling the train step; step = median wall time after --warmup steps;
pairs/s = batch / step; tokens/s counts each pair's prompt once plus both completions (the same for
every layout and TRL); FLOPs per pair are jaxdpo.training.flops' DPO-aware count on the layout's real tokens
(policy forward+backward, reference forward when it runs); MFU divides achieved FLOP/s by the
matmul peak measured in this run (CPU) or the device's published peak (GPU/TPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_real  # noqa: E402
from bench_assets import (  # noqa: E402
    SHAPES,
    make_model,
    make_tokenizer,
    pairs_of_groups,
    synthetic_groups,
    synthetic_rows,
)

GENERATE_MODEL = "ckpt/smollm2-135m-instruct"


# -- jaxdpo -----------------------------------------------------------------------------------------
def run_jaxdpo(args, model_dir: str, tokenizer_dir: str, train_file: str, layout: str, workdir: str, *,
               batch_size: int = 0, group: str = "", shuffle: bool = True) -> dict:
    """One layout's figures; `batch_size` (examples per step) overrides --batch-size, `group` sets loss.group,
    `shuffle` data.shuffle."""
    import jax
    import numpy as np

    from configs import dpo
    from jaxdpo.training import batches as batches_lib
    from jaxdpo.training import build, flops

    c = dpo.get_config()
    c.workdir = workdir
    c.model.path = model_dir
    c.model.tokenizer = tokenizer_dir
    c.model.dtype = args.dtype
    c.model.param_dtype = args.param_dtype or args.dtype
    c.model.attention = args.attention
    c.model.logprob_chunk = args.chunk
    c.model.remat = args.remat
    c.data.train_files, c.data.eval_files = train_file, ""
    c.data.max_length, c.data.max_prompt_length = args.max_length, args.max_prompt_length
    c.data.truncation = "keep_end"
    c.data.layout = layout
    c.data.shuffle = shuffle
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.loss.group = group
    c.train.batch_size = batch_size or args.batch_size
    c.train.micro_batch_size = args.micro_batch_size or c.train.batch_size
    c.train.eval_batch_size = c.train.micro_batch_size
    c.train.steps = args.warmup + args.steps
    c.reference.mode = args.reference
    c.mesh.fsdp = -1

    mesh = build.make_mesh(c)
    data = build.build_data(c, mesh)
    policy = build.build_policy(c, mesh, resuming=False)
    t0 = time.perf_counter()
    reference = build.build_reference(c, mesh, policy, data)  # cached: the one pass that fills the cache
    reference_s = time.perf_counter() - t0
    steps = build.build_steps(c, mesh, policy, reference, data)
    state = build.train_state(policy, steps, resuming=False)

    batches = [batches_lib.train_batch(data.batcher, reference, s, steps.train_batch_shardings)
               for s in range(c.train.steps)]
    # The packed layout's row count can differ between steps: compile every shape before timing (a
    # real run compiles each once too), and report the first compile.
    executables, compile_times = {}, []
    for batch in batches:
        signature = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if signature not in executables:
            t0 = time.perf_counter()
            executables[signature] = steps.train_step.lower(state, policy.frozen, reference.params,
                                                            batch).compile()
            compile_times.append(time.perf_counter() - t0)
    compile_s = compile_times[0]
    compiled = next(iter(executables.values()))
    memory = compiled.memory_analysis()
    compiled_bytes = None
    if memory is not None:
        compiled_bytes = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                             + memory.output_size_in_bytes - memory.alias_size_in_bytes)

    times = []
    for batch in batches:
        t0 = time.perf_counter()
        signature = tuple(sorted((k, v.shape) for k, v in batch.items()))
        state, metrics = executables[signature](state, policy.frozen, reference.params, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    losses = [float(m) for m in [metrics["loss"]]]

    step_flops = [flops.step_flops(policy.model_config, data.batcher.train_batch(s),
                                   reference_forward=reference.runs_forward)
                  for s in range(args.warmup, c.train.steps)]
    per_pair = float(np.mean([f["per_pair"] for f in step_flops]))
    pair_tokens = float(np.mean([sum(len(x) for x in data.train_pairs[int(i)])
                                 for s in range(c.train.steps) for i in data.batcher.step_indices(s)]))
    fed_tokens = float(np.mean([f["tokens"] for f in step_flops]))
    peak_device = None
    device = jax.devices()[0]
    if device.platform != "cpu":
        peak_device = device.memory_stats().get("peak_bytes_in_use")
    pairs_s = c.train.batch_size / step_s
    return {
        "layout": layout, "row_length": data.row_length, "params": policy.num_params,
        "compile_s": compile_s, "compiled_shapes": len(compile_times), "step_s": step_s, "step_times_s": times, "pairs_per_s": pairs_s,
        "tokens_per_s": pairs_s * pair_tokens, "fed_tokens_per_step": fed_tokens,
        "flops_per_pair": per_pair, "achieved_flops_per_s": per_pair * pairs_s,
        "compiled_memory_bytes": compiled_bytes, "peak_device_memory_bytes": peak_device,
        "last_loss": losses[-1], "reference_build_s": reference_s,
    }


# -- TRL --------------------------------------------------------------------------------------------
def run_trl(args, model_dir: str, tokenizer_dir: str, rows: list[dict], workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    steps = args.warmup + args.steps
    n = steps * args.batch_size
    config = DPOConfig(output_dir=workdir, per_device_train_batch_size=args.batch_size, max_steps=steps,
                       max_length=args.max_length, learning_rate=5e-4, beta=0.1, logging_steps=1,
                       report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                       bf16=args.dtype == "bfloat16", seed=0, dataloader_num_workers=0,
                       gradient_accumulation_steps=1)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows[:n]),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    step_s = statistics.median(times[args.warmup:])
    return {"step_s": step_s, "step_times_s": times, "pairs_per_s": args.batch_size / step_s,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


# -- memory with a large vocabulary ------------------------------------------------------------------
def memory_vs_length(args) -> dict:
    """Compiled temp memory of the train step at two sequence lengths with a large vocabulary: with
    chunked logprobs it grows by far less than the [R,T,V] float32 logits would."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from configs import dpo
    from jaxdpo.models import Decoder, ModelConfig
    from jaxdpo.preference.reference import DeviceReference
    from jaxdpo.training.objectives import PreferenceObjective
    from jaxdpo.training.step import init_state, make_train_step

    shape = SHAPES[args.shape]
    cfg = ModelConfig(vocab_size=args.memory_vocab, hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                      num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                      head_dim=shape["hidden"] // shape["heads"])
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract, nnx.Param, ...)
    optimizer = optax.adamw(1e-4)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    pairs = args.batch_size
    out = {"vocab": args.memory_vocab, "pairs": pairs, "chunk": args.chunk, "lengths": {}}
    for t in (args.max_length, 2 * args.max_length):
        objective = PreferenceObjective(dpo.get_config().loss, reference=DeviceReference(), chunk_size=args.chunk)
        train_step = make_train_step(graphdef, objective=objective, optimizer=optimizer,
                                     schedule=optax.constant_schedule(1e-4), num_pairs=pairs)
        rows = jax.ShapeDtypeStruct((1, 2 * pairs, t), jnp.int32)
        batch = {k: rows for k in ("input_ids", "positions", "segment_ids", "branch_ids", "targets",
                                   "pair_index", "side")}
        batch["pair_valid"] = jax.ShapeDtypeStruct((1, pairs), jnp.int32)
        compiled = jax.jit(train_step).lower(state, frozen, params, batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        out["lengths"][t] = {"temp_bytes": int(temp), "full_logits_bytes": int(2 * pairs * t * cfg.vocab_size * 4)}
    (t1, a), (t2, b) = out["lengths"].items()
    out["temp_growth_bytes"] = b["temp_bytes"] - a["temp_bytes"]
    out["full_logits_growth_bytes"] = b["full_logits_bytes"] - a["full_logits_bytes"]
    return out


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-20m", choices=sorted(SHAPES))
    p.add_argument("--data", default="", help="JSONL of prompt/chosen/rejected strings (default: synthetic)")
    p.add_argument("--prompt-len", type=int, default=90, help="synthetic: mean prompt tokens")
    p.add_argument("--completion-len", type=int, default=30, help="synthetic: mean tokens of each completion")
    p.add_argument("--jitter", type=float, default=0.6, help="synthetic: lengths vary by +-this fraction")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward/backward (0: the batch; "
                   "with --model, configs/smollm2.py's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layouts", default="prefix_shared")
    p.add_argument("--reference", default="device", choices=("device", "cached", "none"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--param-dtype", default="", choices=("", "float32", "bfloat16"),
                   help="params and optimizer state (default: --dtype)")
    p.add_argument("--attention", default="xla", help="model.attention: xla | cudnn (GPU) | splash (TPU)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--remat", default="none")
    p.add_argument("--vs-trl", action="store_true", help="also run TRL's DPOTrainer on the same weights/data")
    p.add_argument("--memory-vocab", type=int, default=0, help="only the compiled-memory check at this vocab")
    p.add_argument("--sequence", default="", help="mesh.sequence settings (e.g. 1,2,4,8): per-device memory "
                   "and step time of the policy forward+backward; see tools/sequence_bench.py")
    p.add_argument("--devices", type=int, default=8, help="--sequence on CPU: simulated devices")
    p.add_argument("--time-length", type=int, default=2048, help="--sequence: row length of the timed steps")
    p.add_argument("--budget-mib", type=int, default=1024, help="--sequence: per-device memory budget")
    p.add_argument("--generate", action="store_true",
                   help="only decode tokens/s of jaxdpo.sampling.generate vs transformers' generate (tools/bench_generate.py)")
    p.add_argument("--model", default="", help="a HF model directory: with --generate the decode comparison "
                   f"(default {GENERATE_MODEL}), else the real-model side by side (tools/bench_real.py)")
    p.add_argument("--batch-sizes", default="1,32", help="--generate: comma-separated rows per call")
    p.add_argument("--new-tokens", type=int, default=64, help="--generate: tokens decoded per row")
    p.add_argument("--torch-threads", type=int, default=0, help="--generate: transformers' threads (0 = torch's)")
    p.add_argument("--groups", type=int, default=0, help="answers per group: --batch-size groups in one grouped "
                   "row each against their pairs as prefix_shared rows (0 = off)")
    p.add_argument("--base-dtypes", default="", help="only QLoRA memory (tools/qlora_bench.py): for these "
                   "lora.base_dtype values (e.g. none,int8,nf4) the params' bytes per device and the compiled "
                   "LoRA train step's memory, of --model's config.json or --shape")
    p.add_argument("--fsdp", type=int, default=1, help="--base-dtypes: mesh.fsdp (CPU: simulated devices)")
    p.add_argument("--tensor", type=int, default=1, help="--base-dtypes: mesh.tensor (CPU: simulated devices)")
    p.add_argument("--json", default="", help="write every figure here")
    bench_real.add_arguments(p)
    args = p.parse_args(argv)

    if args.sequence:
        from tools import sequence_bench

        if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            sequence_bench.simulated_devices_flags(os.environ, args.devices)
        report = {"args": vars(args), "sequence": sequence_bench.run(args, SHAPES[args.shape])}
        _write(args, report)
        return report

    if args.base_dtypes:
        from tools import qlora_bench

        report = {"args": vars(args), "qlora": qlora_bench.bench(args, SHAPES)}
        _write(args, report)
        return report

    import jax

    from jaxdpo.training import flops

    report: dict = {"args": vars(args), "backend": jax.default_backend(), "devices": jax.device_count(),
                    "device_kind": jax.devices()[0].device_kind}
    if args.generate:
        from bench_generate import bench_generate

        report["generate"] = bench_generate(args.model or GENERATE_MODEL, [int(b) for b in args.batch_sizes.split(",")],
                                            args.new_tokens, repeats=args.steps, dtype=args.dtype,
                                            torch_threads=args.torch_threads)
        _write(args, report)
        return report
    if args.model:
        report["real"] = bench_real.side_by_side(args, flops.measure_matmul_peak())
        _write(args, report)
        return report
    if args.memory_vocab:
        report["memory"] = memory_vs_length(args)
        m = report["memory"]
        for t, v in m["lengths"].items():
            print(f"T={t}: compiled temp {v['temp_bytes'] / 2**20:.1f} MiB "
                  f"(full [R,T,V] fp32 logits would be {v['full_logits_bytes'] / 2**20:.1f} MiB)")
        print(f"temp growth T->2T: {m['temp_growth_bytes'] / 2**20:.1f} MiB vs logits growth "
              f"{m['full_logits_growth_bytes'] / 2**20:.1f} MiB")
        _write(args, report)
        return report

    tmp = tempfile.mkdtemp(prefix="jaxdpo_bench_")
    shape = SHAPES[args.shape]
    model_dir, tokenizer_dir = os.path.join(tmp, "model"), os.path.join(tmp, "tokenizer")
    # Loaded from beside a model's config.json, transformers would build the model family's own tokenizer
    # class (Qwen2Tokenizer for qwen2), which splits no "w<i>" word: every pair would be BOS and two EOS.
    tokenizer = make_tokenizer(tokenizer_dir, shape["vocab"])
    report["hf_params"] = make_model(model_dir, tokenizer, shape)
    if args.groups:
        report["groups"] = groups_vs_pairs(args, model_dir, tokenizer_dir, tmp)
        _write(args, report)
        return report
    n = (args.warmup + args.steps) * args.batch_size
    if args.data:
        rows = bench_real.data_rows(args, n)
    else:
        rows = synthetic_rows(n, shape["vocab"], args.prompt_len, args.completion_len, args.jitter, seed=0)
    train_file = os.path.join(tmp, "train.jsonl")
    with open(train_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    device = jax.devices()[0]
    if device.platform == "cpu":
        peak, peak_source = flops.measure_matmul_peak(), "measured fp32 matmul"
    else:
        peak, peak_source = flops.device_peak_flops(device), "published bf16 peak"
        peak = peak * jax.device_count() if peak else None
    report["peak_flops_per_s"], report["peak_source"] = peak, peak_source
    print(f"{report['backend']} x{report['devices']} ({report['device_kind']}); model {args.shape} "
          f"{report['hf_params'] / 1e6:.1f}M params; peak {peak / 1e9 if peak else float('nan'):.1f} GFLOP/s "
          f"({peak_source})")

    report["jaxdpo"] = {}
    for layout in args.layouts.split(","):
        r = run_jaxdpo(args, model_dir, tokenizer_dir, train_file, layout, os.path.join(tmp, f"run_{layout}"))
        r["mfu"] = flops.mfu(r["achieved_flops_per_s"], peak)
        report["jaxdpo"][layout] = r
        mem = r["peak_device_memory_bytes"] or r["compiled_memory_bytes"]
        print(f"jaxdpo {layout:14s} T={r['row_length']:4d} compile {r['compile_s']:6.1f}s  step "
              f"{r['step_s'] * 1e3:8.1f}ms  {r['pairs_per_s']:7.2f} pairs/s  {r['tokens_per_s']:8.0f} tok/s  "
              f"{r['flops_per_pair'] / 1e9:6.2f} GFLOP/pair  MFU {100 * (r['mfu'] or 0):5.1f}%  "
              f"mem {mem / 2**20 if mem else float('nan'):.0f} MiB")
        if args.reference == "cached":
            print(f"  reference cache for {len(rows)} pairs built in {r['reference_build_s']:.1f}s (once per "
                  f"dataset and reference; later runs and epochs reuse it)")
    layouts = report["jaxdpo"]
    if "padded" in layouts:
        for name, r in layouts.items():
            if name != "padded":
                r["speedup_vs_padded"] = r["pairs_per_s"] / layouts["padded"]["pairs_per_s"]
                print(f"  {name} / padded pairs/s: {r['speedup_vs_padded']:.2f}x")

    if args.vs_trl:
        try:
            report["trl"] = run_trl(args, model_dir, tokenizer_dir, rows, os.path.join(tmp, "trl"))
        except ImportError as e:
            report["trl"] = {"error": f"TRL is not importable: {e}"}
            print(report["trl"]["error"])
        else:
            best = max(layouts.values(), key=lambda r: r["pairs_per_s"])
            report["trl"]["jaxdpo_best_layout"] = best["layout"]
            report["trl"]["jaxdpo_over_trl"] = best["pairs_per_s"] / report["trl"]["pairs_per_s"]
            print(f"TRL DPOTrainer (torch {report['trl']['torch']}, {report['trl']['torch_threads']} threads): "
                  f"step {report['trl']['step_s'] * 1e3:.1f}ms  {report['trl']['pairs_per_s']:.2f} pairs/s; "
                  f"jaxdpo ({best['layout']}) / TRL = {report['trl']['jaxdpo_over_trl']:.2f}x")
    _write(args, report)
    return report


def groups_vs_pairs(args, model_dir: str, tokenizer_dir: str, tmp: str) -> dict:
    """--batch-size groups of --groups answers per step in one shared row each (data.layout=grouped,
    loss.group=all_pairs) against the same groups' pairs, one prefix_shared row each (K(K-1)/2 per group):
    the same loss terms in data order (so the losses agree too), and tokens fed per step and step time compare
    what sharing the prompt saves."""
    shape, k = SHAPES[args.shape], args.groups
    groups = synthetic_groups((args.warmup + args.steps) * args.batch_size, k, shape["vocab"], args.prompt_len,
                              args.completion_len, args.jitter, seed=0)
    files = {}
    for name, rows in (("groups", groups), ("pairs", pairs_of_groups(groups))):
        files[name] = os.path.join(tmp, f"{name}.jsonl")
        with open(files[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    pairs_per_group = k * (k - 1) // 2
    grouped = run_jaxdpo(args, model_dir, tokenizer_dir, files["groups"], "grouped", os.path.join(tmp, "run_groups"),
                         group="all_pairs", shuffle=False)
    paired = run_jaxdpo(args, model_dir, tokenizer_dir, files["pairs"], "prefix_shared", os.path.join(tmp, "run_pairs"),
                        batch_size=args.batch_size * pairs_per_group, shuffle=False)
    out = {"answers": k, "groups_per_step": args.batch_size, "pairs_per_step": args.batch_size * pairs_per_group,
           "grouped": grouped, "prefix_shared_pairs": paired,
           "fed_tokens_ratio": paired["fed_tokens_per_step"] / grouped["fed_tokens_per_step"],
           "step_time_ratio": paired["step_s"] / grouped["step_s"]}
    for name, r in (("grouped (1 row/group)", grouped), (f"prefix_shared ({pairs_per_group} rows/group)", paired)):
        print(f"{name:28s} T={r['row_length']:4d}  {r['fed_tokens_per_step']:8.0f} tokens/step  step "
              f"{r['step_s'] * 1e3:8.1f}ms  compile {r['compile_s']:5.1f}s  last loss {r['last_loss']:.6f}")
    print(f"pairs as prefix_shared rows / groups in one row: {out['fed_tokens_ratio']:.2f}x tokens per step, "
          f"{out['step_time_ratio']:.2f}x step time")
    return out


def _write(args, report):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
