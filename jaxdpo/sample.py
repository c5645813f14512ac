"""Sample completions from a model: python -m jaxdpo.sample --model=PATH --prompts=FILE --max_new_tokens=N
--temperature=T [--top_p= --top_k= --seed= --batch_size= --stop= --dtype= --base= --truncate_prompt=]
--output=OUT.jsonl

PATH is a Hugging Face model directory, a jaxdpo run's WORKDIR (its newest checkpoint), WORKDIR/checkpoints
or one step directory in it; a LoRA run's adapters are applied on the base model the run recorded
(`--base` overrides it). FILE holds the prompts (jaxdpo/sampling/prompts.py reads it, as online.prompts):
a .jsonl file has one JSON object a line with `prompt` (a string, or a list of {"role", "content"} messages
rendered with the chat template and the generation prompt); a .txt file has one plain-text prompt a line.
A prompt whose tokens and max_new_tokens exceed the model's positions is an error unless
--truncate_prompt (keep_end | keep_start, as data.truncation) says how to cut it.
Each output line: `prompt` (as given), `completion` (text, cut before a --stop string) and `completion_ids`
(through the EOS id, or the stop string's tokens, when one was produced). `--temperature=0` is greedy.
Draws depend only on --seed and the prompt's line, not on --batch_size or the number of devices."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") and \
        "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"  # see DEVELOPING.md

from jaxdpo.errors import ConfigError
from jaxdpo.sampling import prompts as prompts_lib

# names of jaxdpo.models.config.DTYPES, spelled out so that parsing the command line imports no jax
DTYPE_CHOICES = ("float32", "bfloat16")


def parse_args(argv):
    parser = _Parser(prog="python -m jaxdpo.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model dir, run WORKDIR, or checkpoint step dir")
    parser.add_argument("--prompts", required=True, help="a .jsonl file of {\"prompt\": ...} lines, or .txt: "
                        "one plain-text prompt a line")
    parser.add_argument("--output", required=True, help="where to write the completions (JSONL)")
    parser.add_argument("--max_new_tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per compiled call")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype")
    parser.add_argument("--base", default=None, help="LoRA checkpoints: the base model dir (default: the run's)")
    parser.add_argument("--truncate_prompt", choices=prompts_lib.TRUNCATIONS, default=None,
                        help="cut prompts too long for the model's positions (default: refuse them)")
    return parser.parse_args(argv)


def load_model(path: str, *, dtype: str, base: str | None):
    """(model, tokenizer, the model's HF dir: its generation_config.json names EOS ids) for an HF dir or a
    jaxdpo checkpoint."""
    from transformers import AutoTokenizer

    from jaxdpo.models import from_pretrained
    from jaxdpo.models.config import DTYPES

    if not os.path.isdir(path):
        raise ConfigError(f"--model: {path} is not a directory (an HF model dir or a jaxdpo run's WORKDIR)")
    path = _online_final_policy(path)
    if os.path.exists(os.path.join(path, "config.json")):
        return from_pretrained(path, dtype=DTYPES[dtype]), AutoTokenizer.from_pretrained(path), path
    from jaxdpo.checkpoint.saved_policy import (
        build_model,
        find_tokenizer,
        locate,
        read_params,
    )

    checkpoints_dir, step, workdir = locate(path)
    params, meta = read_params(checkpoints_dir, step)
    model, _ = build_model(params, meta, base=base, dtype=DTYPES[dtype])
    tokenizer = find_tokenizer(workdir, meta)
    if tokenizer is None:
        raise ConfigError(f"--model: no tokenizer found for {path} (looked in WORKDIR/hf and the run's model path)")
    return model, tokenizer, meta.get("model_path") or ""


def _online_final_policy(path: str) -> str:
    """An on-policy run's WORKDIR (rounds/ and no checkpoints/ of its own) stands for its final policy: the
    export, which the run's last round writes."""
    if not os.path.isdir(os.path.join(path, "rounds")) or os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    from jaxdpo.online import rounds

    final = rounds.final_policy(path)
    if final is None:
        raise ConfigError(f"--model: {path} is an on-policy run that has not exported its policy yet (its last "
                          f"round does, when some round trained)")
    return final


def sample_file(args) -> dict:
    """Run the CLI's work; returns {"rows", "new_tokens", "seconds"}."""
    from jaxdpo.parallel import distributed

    distributed.initialize()  # several hosts (a pod, srun, JAXDPO_* variables) sample as one; else nothing
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    from jaxdpo.models import hub
    from jaxdpo.parallel import sharding
    from jaxdpo.sampling import generate, text

    settings = generate.SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size = {args.batch_size} must be positive")
    prompts = prompts_lib.read_prompts(args.prompts, prompts_lib.PromptKeys(), config_key="--prompts")
    prompts_lib.check_output_path(args.output, args.prompts, config_key="--prompts", output_key="--output")
    model_path = hub.resolve(args.model, "--model")
    base = hub.resolve(args.base, "--base") if args.base else None
    model, tokenizer, model_dir = load_model(model_path, dtype=args.dtype, base=base)
    # FSDP over every local device that divides the hidden size evenly; the rest split the batch
    fsdp = math.gcd(jax.device_count(), model.config.hidden_size)
    mesh = sharding.make_mesh(data=jax.device_count() // fsdp, fsdp=fsdp)
    with jax.set_mesh(mesh):
        model = _sharded(model, mesh)
        eos_ids = text.stop_ids(tokenizer, model.config, model_dir)
        graphdef, state = nnx.split(model)
        encoded = text.encode_prompts(tokenizer, prompts, prompts_lib.PromptRoom(
            model.config.max_position, args.truncate_prompt), settings.max_new_tokens)
        bar = tqdm(total=len(prompts), unit="prompt", desc="sampling", disable=not distributed.is_main_process())
        counted = {"tokens": 0}

        def on_batch(rows, new_tokens):
            counted["tokens"] += new_tokens
            bar.update(rows)

        start = time.perf_counter()
        rows = text.completions_with_logprobs(graphdef, (state,), tokenizer, encoded.ids, settings,
                                                  eos_ids=eos_ids, stop_strings=args.stop, batch_size=args.batch_size,
                                                  on_batch=on_batch)
        seconds = time.perf_counter() - start
        bar.close()
    if distributed.is_main_process():  # every process holds every row
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for prompt, row in zip(prompts, rows):
                f.write(json.dumps({"prompt": prompt, "completion": row["completion"],
                                    "completion_ids": row["completion_ids"]}, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "new_tokens": counted["tokens"], "seconds": seconds,
            "cut": encoded.cut, "main_process": distributed.is_main_process()}


def _sharded(model, mesh):
    """The model's params placed by their logical axes on `mesh` (the same layout as training)."""
    import jax
    from flax import nnx

    state = nnx.state(model)
    if jax.process_count() > 1:  # an array restored onto a local device cannot be put onto other hosts'
        state = jax.device_get(state)  # devices; its host copy can, each host taking its own shards
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return model


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as every jaxdpo user error
        print(f"jaxdpo.sample: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = sample_file(args)
    except (ConfigError, OSError, ValueError) as e:  # the user's files or flags; ConfigError is a ValueError
        print(f"jaxdpo.sample: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    rate = result["new_tokens"] / max(result["seconds"], 1e-9)
    if result["main_process"]:
        if result["cut"]:
            print(f"cut {result['cut']} of {result['rows']} prompts ({args.truncate_prompt}) to fit the model's "
                  f"positions with --max_new_tokens={args.max_new_tokens}")
        print(f"wrote {result['rows']} completions to {args.output}: {result['new_tokens']} new tokens in "
              f"{result['seconds']:.1f} s ({rate:.1f} tokens/s, compilation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
