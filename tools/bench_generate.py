"""Decode speed of jaxdpo.sampling.generate against transformers' generate on the same weights, in the same process.

    python tools/bench.py --generate --model ckpt/smollm2-135m-instruct --batch-sizes 1,32 --new-tokens 64

Both decode greedily from the same chat prompts (SmolLM2's template) for exactly --new-tokens tokens per row
(EOS does not stop a row: no EOS ids for jaxdpo, min_new_tokens for transformers), so both produce the same
number of tokens. decode tokens/s = rows * (N - 1) / (time for N new tokens - time for 1 new token): the
prompt's prefill and the first token are taken out, what is left is the per-token loop. Each time is the
median of --repeats calls after one untimed call (jaxdpo: compilation; transformers: warm-up). Decode tokens
per CPU-second take the same difference of the process's CPU time (every thread): on a machine other jobs
share, wall time follows their load, CPU time much less.
"""

from __future__ import annotations

import statistics
import time

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea.",
             "How many legs does a spider have?", "What do bees make?", "Give me a synonym for happy.",
             "Why is the sky blue?", "What is 12 times 3?"]


def _median_seconds(run, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of one call."""
    run()  # compile / warm up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _jaxdpo_runner(model_dir: str, prompts: list[list[int]], pad_id: int, dtype: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdpo.models import from_pretrained
    from jaxdpo.sampling import generate

    model = from_pretrained(model_dir, dtype=getattr(jnp, dtype))
    graphdef, state = nnx.split(model)

    def run(new_tokens: int):
        settings = generate.SamplingSettings(max_new_tokens=new_tokens)
        out = generate.generate(graphdef, (state,), prompts, settings, eos_ids=(), pad_id=pad_id)
        assert all(len(c.ids) == new_tokens for c in out)
        jax.effects_barrier()

    return run


def _transformers_runner(model_dir: str, prompts: list[list[int]], pad_id: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(new_tokens: int):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad_id)
        assert out.shape == (len(prompts), width + new_tokens)

    return run


def decode_tokens_per_s(run, rows: int, new_tokens: int, repeats: int) -> dict:
    """Decode tokens per wall second and per CPU second, and the wall seconds for new_tokens and for 1."""
    full, full_cpu = _median_seconds(lambda: run(new_tokens), repeats)
    first, first_cpu = _median_seconds(lambda: run(1), repeats)
    decoded = rows * (new_tokens - 1)
    return {"decode_tokens_per_s": decoded / (full - first),
            "decode_tokens_per_cpu_s": decoded / (full_cpu - first_cpu), "seconds": full, "seconds_first_token": first}


def bench_generate(model_dir: str, batch_sizes: list[int], new_tokens: int, repeats: int = 3,
                   dtype: str = "float32", torch_threads: int = 0) -> dict:
    import torch
    from transformers import AutoTokenizer

    from jaxdpo.sampling.text import encode_prompt

    if torch_threads:
        torch.set_num_threads(torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = {"model": model_dir, "new_tokens": new_tokens, "dtype": dtype, "torch_threads": torch.get_num_threads(),
              "batches": {}}
    for batch in batch_sizes:
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                   for i in range(batch)]
        row = {}
        for name, make in (("jaxdpo", _jaxdpo_runner), ("transformers", _transformers_runner)):
            row[name] = decode_tokens_per_s(make(model_dir, prompts, pad_id, dtype), batch, new_tokens, repeats)
        row["speedup"] = row["jaxdpo"]["decode_tokens_per_s"] / row["transformers"]["decode_tokens_per_s"]
        report["batches"][batch] = row
        jax_side, torch_side = row["jaxdpo"], row["transformers"]
        print(f"batch {batch:3d}: jaxdpo {jax_side['decode_tokens_per_s']:8.1f} tok/s "
              f"({jax_side['decode_tokens_per_cpu_s']:.1f}/CPU-s)  transformers "
              f"{torch_side['decode_tokens_per_s']:8.1f} tok/s ({torch_side['decode_tokens_per_cpu_s']:.1f}/CPU-s)  "
              f"-> {row['speedup']:.2f}x", flush=True)
    return report
