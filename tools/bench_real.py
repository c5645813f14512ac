"""A real model, side by side: jaxdpo and TRL's DPOTrainer (+ peft for LoRA) on one Hugging Face checkpoint,
the same rows, batch and steps.

    python tools/bench.py --model ckpt/smollm2-135m-instruct --lora-rank 16 --vs-trl --reference cached
    python tools/bench.py --model DIR --data pairs.jsonl --lora-rank 0 --vs-trl --dtype bfloat16
    python tools/bench.py --model DIR --lora-rank 16 --profile /tmp/profile   # jaxdpo only, plus an op profile

Each side runs in a child process of its own, so its peak RSS (getrusage) is its own. Reference modes go
together: `--reference cached` is jaxdpo's cached reference vs TRL's `precompute_ref_log_probs=True` (TRL's
best: its defaults plus that flag); `--reference device` is a live reference on both sides (under LoRA jaxdpo's
lora_base and TRL's adapters-off forward; full fine-tuning a frozen copy on both). The one-off reference pass
is never timed on either side. `--dtype bfloat16` is jaxdpo's bf16 compute with fp32 params against TRL's
`bf16=True` (autocast). Without --data the rows are conversational and generated here: a user prompt of about
--prompt-tokens tokens after the chat template, answers of about --chosen-tokens and --rejected-tokens.

Figures per side: step = median wall time of the timed steps; pairs/s = batch / step, and pairs per CPU
second (the process's CPU time: on a shared machine wall time counts other people's work too); tokens/s counts each
pair's prompt once and both completions (the same count for both sides); FLOPs per pair: jaxdpo's are
jaxdpo.training.flops' count on what it feeds (prompt once, LM head on completion tokens only); TRL's are
the same formula on what TRL feeds (two rows of prompt + completion per pair, the LM head on every token,
padding not counted); achieved GFLOP/s = FLOPs per pair x pairs/s, also as a fraction of the fp32 matmul
peak measured in this run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the model learns from pairs of answers where one is preferred and the other is not so we measure how "
         "fast each trainer runs on a small machine with two cores while people wait for the numbers to come back "
         "every step reads the prompt and both answers then updates the weights of the adapters or the whole "
         "network").split()


def add_arguments(parser) -> None:
    """The real-model options of tools/bench.py (active when --model is given without --generate)."""
    parser.add_argument("--lora-rank", type=int, default=16, help="--model: LoRA rank on every projection; 0 = "
                        "full fine-tuning")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="--model: LoRA alpha (both sides)")
    parser.add_argument("--prompt-tokens", type=int, default=180, help="--model without --data: prompt tokens")
    parser.add_argument("--chosen-tokens", type=int, default=100, help="--model without --data: chosen tokens")
    parser.add_argument("--rejected-tokens", type=int, default=70, help="--model without --data: rejected tokens")
    parser.add_argument("--profile", default="", help="--model: trace one more jaxdpo step into this directory "
                        "and print its top ops (tools/xla_profile.py)")


# -- rows -----------------------------------------------------------------------------------------------
def _text_of_tokens(tokenizer, rng, tokens: int) -> str:
    """Words from WORDS whose tokenization (no special tokens) is as close to `tokens` as a word allows."""
    words = [rng.choice(WORDS) for _ in range(tokens)]
    while len(words) > 1 and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > tokens:
        words.pop()
    return " ".join(words)


def conversational_rows(tokenizer, n: int, prompt_tokens: int, chosen_tokens: int, rejected_tokens: int,
                        seed: int = 0) -> list[dict]:
    """n conversational pairs; the prompt's length counts the chat template (system prompt, turn markers)."""
    rng = random.Random(seed)
    template = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True))
    jitter = lambda mean: max(1, round(mean * rng.uniform(0.8, 1.2)))  # noqa: E731
    rows = []
    for _ in range(n):
        prompt = _text_of_tokens(tokenizer, rng, max(1, jitter(prompt_tokens) - template))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": _text_of_tokens(tokenizer, rng, jitter(chosen_tokens))}],
                     "rejected": [{"role": "assistant",
                                   "content": _text_of_tokens(tokenizer, rng, jitter(rejected_tokens))}]})
    return rows


def data_rows(args, n: int) -> list[dict]:
    """The first `n` rows of --data; exits naming the file when it holds fewer."""
    rows = [json.loads(line) for line in open(args.data) if line.strip()][:n]
    if len(rows) < n:
        sys.exit(f"--data {args.data} has {len(rows)} rows; {n} are needed for "
                 f"(warmup+steps)*batch_size = ({args.warmup}+{args.steps})*{args.batch_size}")
    return rows


def write_rows(args, path: str) -> int:
    """The benchmarked rows -> path (JSONL); how many."""
    n = (args.warmup + args.steps) * args.batch_size
    if args.data:
        rows = data_rows(args, n)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        rows = conversational_rows(tokenizer, n, args.prompt_tokens, args.chosen_tokens, args.rejected_tokens)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)


# -- FLOPs --------------------------------------------------------------------------------------------
def two_row_forward_flops(cfg, lengths: list[tuple[int, int, int]]) -> float:
    """Forward FLOPs of pairs fed as two causal rows each (prompt + chosen, prompt + rejected) with the LM head
    on every token: what TRL's DPOTrainer feeds, padding not counted."""
    from jaxdpo.training import flops

    per_token = 2 * flops.layer_matmul_params(cfg) + 2 * cfg.hidden_size * cfg.vocab_size
    per_visible = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    total = 0.0
    for p, c, r in lengths:
        for row in (p + c, p + r):
            total += per_token * row + per_visible * row * (row + 1) / 2
    return total


# -- jaxdpo -------------------------------------------------------------------------------------------
def jaxdpo_config(args, train_file: str, workdir: str):
    """configs/dpo.py set to the bench's model and rows; pairs per micro-batch as configs/smollm2.py has them
    unless --micro-batch-size says otherwise."""
    from configs import dpo, smollm2

    c = dpo.get_config()
    c.workdir = workdir
    c.model.path = args.model
    c.model.dtype = args.dtype
    c.model.param_dtype = args.param_dtype or "float32"
    c.model.logprob_chunk = args.chunk
    c.model.remat = args.remat
    c.lora.rank = args.lora_rank
    c.lora.alpha = args.lora_alpha
    c.data.train_files, c.data.eval_files = train_file, ""
    c.data.max_length, c.data.max_prompt_length = args.max_length, args.max_prompt_length
    c.data.layout = args.layouts.split(",")[0]
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.train.batch_size = args.batch_size
    micro = args.micro_batch_size or min(args.batch_size, smollm2.get_config().train.micro_batch_size)
    c.train.micro_batch_size = micro
    c.train.eval_batch_size = c.train.micro_batch_size
    c.train.steps = args.warmup + args.steps
    c.reference.mode = args.reference
    return c


def run_jaxdpo(args, train_file: str, workdir: str) -> dict:
    import jax
    import numpy as np

    from jaxdpo.training import batches as batches_lib
    from jaxdpo.training import build, flops

    c = jaxdpo_config(args, train_file, workdir)
    mesh = build.make_mesh(c)
    data = build.build_data(c, mesh)
    policy = build.build_policy(c, mesh, resuming=False)
    t0 = time.perf_counter()
    reference = build.build_reference(c, mesh, policy, data)
    reference_s = time.perf_counter() - t0
    steps = build.build_steps(c, mesh, policy, reference, data)
    state = build.train_state(policy, steps, resuming=False)
    batches = [batches_lib.train_batch(data.batcher, reference, s, steps.train_batch_shardings)
               for s in range(c.train.steps)]
    t0 = time.perf_counter()
    step = steps.train_step.lower(state, policy.frozen, reference.params, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for s, batch in enumerate(batches):
        t0, cpu0 = time.perf_counter(), time.process_time()
        state, metrics = step(state, policy.frozen, reference.params, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)
        print(f"jaxdpo step {s}: {times[-1]:.1f}s wall, {cpu_times[-1]:.1f}s CPU", flush=True)
    if args.profile:
        from xla_profile import profile_calls

        profile_calls(lambda: jax.block_until_ready(step(state, policy.frozen, reference.params, batches[-1])),
                      step.as_text(), args.profile, calls=1)
    timed = range(args.warmup, c.train.steps)
    lengths = [tuple(len(x) for x in data.train_pairs[int(i)]) for s in timed for i in data.batcher.step_indices(s)]
    per_pair = float(np.mean([flops.step_flops(policy.model_config, data.batcher.train_batch(s),
                                               reference_forward=reference.runs_forward)["per_pair"]
                              for s in timed]))
    live_reference = args.reference != "cached"
    trl_per_pair = two_row_forward_flops(policy.model_config, lengths) * (3 + live_reference) / len(lengths)
    return {"compile_s": compile_s, "reference_build_s": reference_s, "step_times_s": times, "step_cpu_s": cpu_times,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
            "tokens_per_pair": float(np.mean([sum(x) for x in lengths])), "flops_per_pair": per_pair,
            "trl_flops_per_pair": trl_per_pair, "last_loss": float(metrics["loss"])}


# -- TRL ----------------------------------------------------------------------------------------------
def run_trl(args, train_file: str, workdir: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.cpu0)

    peft_config = None
    if args.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = DPOConfig(output_dir=workdir, per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, max_length=args.max_length, learning_rate=5e-6,
                       beta=0.1, logging_steps=1, report_to=[], save_strategy="no",
                       use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16", seed=0,
                       dataloader_num_workers=0, precompute_ref_log_probs=args.reference == "cached")
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=train_file)["train"],
                         processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=peft_config,
                         callbacks=[StepTimer()])
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"step_times_s": times, "step_cpu_s": cpu_times, "trainable_params": int(trainable), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# -- the side by side ---------------------------------------------------------------------------------
def child_main(side: str, args_file: str, out_file: str) -> None:
    """One side in this process: its figures and this process's peak RSS -> out_file (JSON)."""
    import argparse

    spec = json.load(open(args_file))
    args = argparse.Namespace(**spec["args"])
    run = {"jaxdpo": run_jaxdpo, "trl": run_trl}[side]
    result = run(args, spec["train_file"], os.path.join(spec["tmp"], side))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump(result, open(out_file, "w"))


def run_side(side: str, args, train_file: str, tmp: str) -> dict:
    args_file, out_file = os.path.join(tmp, f"{side}.args.json"), os.path.join(tmp, f"{side}.json")
    json.dump({"args": vars(args), "train_file": train_file, "tmp": tmp}, open(args_file, "w"))
    subprocess.run([sys.executable, os.path.abspath(__file__), side, args_file, out_file], check=True)
    result = json.load(open(out_file))
    result["step_s"] = statistics.median(result["step_times_s"][args.warmup:])
    result["pairs_per_s"] = args.batch_size / result["step_s"]
    # On a shared machine wall time counts other people's work too; CPU seconds count only this process's.
    result["pairs_per_cpu_s"] = args.batch_size / statistics.median(result["step_cpu_s"][args.warmup:])
    return result


def side_by_side(args, peak_flops_per_s: float) -> dict:
    """Both sides on args.model; figures as the module docstring says."""
    tmp = tempfile.mkdtemp(prefix="jaxdpo_bench_real_")
    train_file = os.path.join(tmp, "train.jsonl")
    rows = write_rows(args, train_file)
    report = {"model": args.model, "rows": rows, "lora_rank": args.lora_rank, "dtype": args.dtype,
              "reference": args.reference, "peak_flops_per_s": peak_flops_per_s,
              "jaxdpo": run_side("jaxdpo", args, train_file, tmp)}
    if args.vs_trl:
        report["trl"] = run_side("trl", args, train_file, tmp)
        report["trl"]["flops_per_pair"] = report["jaxdpo"]["trl_flops_per_pair"]
    tokens_per_pair = report["jaxdpo"]["tokens_per_pair"]
    for name in ("jaxdpo", "trl"):
        if name in report:
            r = report[name]
            r["tokens_per_s"] = r["pairs_per_s"] * tokens_per_pair
            r["achieved_flops_per_s"] = r["flops_per_pair"] * r["pairs_per_s"]
            r["fraction_of_peak"] = r["achieved_flops_per_s"] / peak_flops_per_s
            print(f"{name:7s} step {r['step_s']:6.2f}s  {r['pairs_per_s']:6.3f} pairs/s  {r['tokens_per_s']:6.0f} "
                  f"tok/s  {r['flops_per_pair'] / 1e9:6.1f} GFLOP/pair  {r['achieved_flops_per_s'] / 1e9:5.1f} "
                  f"GFLOP/s ({100 * r['fraction_of_peak']:.0f}% of peak)  peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if "trl" in report:
        jaxdpo, trl = report["jaxdpo"], report["trl"]
        report["speedup"] = jaxdpo["pairs_per_s"] / trl["pairs_per_s"]
        report["speedup_per_cpu_s"] = jaxdpo["pairs_per_cpu_s"] / trl["pairs_per_cpu_s"]
        report["rss_ratio"] = jaxdpo["peak_rss_bytes"] / trl["peak_rss_bytes"]
        print(f"jaxdpo / TRL: {report['speedup']:.2f}x pairs/s ({report['speedup_per_cpu_s']:.2f}x pairs per CPU "
              f"second), {report['rss_ratio']:.2f}x peak RSS")
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    child_main(*sys.argv[1:4])
