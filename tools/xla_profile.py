"""Where a compiled XLA program spends its time, per op and per part of the model, from a jax.profiler trace.

    python tools/bench.py --model DIR --lora-rank 16 --profile /tmp/prof        # the train step
    python tools/xla_profile.py decode --model DIR --batch 1 --new-tokens 64 --out /tmp/prof_decode

XLA:CPU runs a program as thunks and records each one in the trace under its HLO instruction's name
(`hlo_op`). The perfetto JSON the trace writes is read back here: every thunk's self time (its time less the
thunks that ran inside it, such as a while loop's body) is summed per instruction, and each instruction is
put in a part of the model by the jaxdpo source line that made it (the `source_file`/`source_line`
metadata of the compiled HLO) and its opcode: projections, LoRA adapters, attention, the LM head,
optimizer, copies and layout changes, and so on. No extra package is needed (xprof reads the same trace
directory in TensorBoard where it is installed).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(?P<name>[\w.\-]+) = (?P<type>.+?) (?P<opcode>[\w\-]+)\(")
_METADATA = re.compile(r'op_name="(?P<op>[^"]*)"(?:.*?source_file="(?P<file>[^"]*)")?(?:.*?source_line=(?P<line>\d+))?')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")

# (part, where the instruction's source line is: a path fragment and optional function names' lines)
PARTS = (
    ("LoRA adapters", ("models/decoder.py", "lora_update")),
    ("attention (scores, mask, softmax, PV)", ("ops/attention.py", None)),
    ("LM head + logsumexp", ("ops/logprobs.py", "_chunk_logprobs")),
    ("scored gather, pair sums", ("ops/logprobs.py", None)),
    ("projections (q,k,v,o, MLP)", ("models/decoder.py", "_contract")),
    ("norms, RoPE, residuals, MLP activation", ("models/decoder.py", None)),
    ("optimizer (AdamW) and gradient sums", ("optax", None)),
    ("optimizer (AdamW) and gradient sums", ("training/optim.py", None)),
    ("optimizer (AdamW) and gradient sums", ("training/step.py", None)),
    ("loss", ("preference/", None)),
    ("decode loop (cache, sampling)", ("sampling/generate.py", None)),
)
COPY_OPCODES = {"copy", "transpose", "copy-start", "copy-done", "dynamic-update-slice", "dynamic-slice"}


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """name -> {opcode, op_name, file, line} for every instruction of a compiled module's text; a fusion or
    call also lends its metadata to the instructions of the computation it calls that have none."""
    table = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        meta = _METADATA.search(line)
        calls = _CALLS.search(line)
        table[m.group("name")] = {"opcode": m.group("opcode"), "op_name": meta.group("op") if meta else "",
                                  "file": (meta.group("file") or "") if meta else "",
                                  "line": int(meta.group("line") or 0) if meta else 0,
                                  "calls": calls.group(1) if calls else None,
                                  "fused_opcodes": []}
    return table


def _function_lines(path_fragment: str, function: str) -> range | None:
    """The line range of `function` in the jaxdpo file ending in `path_fragment`."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdpo")
    path = os.path.join(root, path_fragment)
    if not os.path.exists(path):
        return None
    lines = open(path).read().splitlines()
    start = next((i for i, l in enumerate(lines) if re.match(rf"\s*def {function}\(", l)), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent
                and not lines[i].lstrip().startswith(("#", ")"))), len(lines))
    return range(start + 1, end + 1)


def part_of(info: dict) -> str:
    """The model part an instruction belongs to (PARTS), "copies and layout changes" for data movement
    that no part claims, else the JAX op name's last component."""
    for part, (fragment, function) in PARTS:
        if fragment in info["file"]:
            if function is None:
                return part
            lines = _function_lines(fragment, function)
            if lines is not None and info["line"] in lines:
                return part
    if info["opcode"] in COPY_OPCODES or "copy" in info["op_name"] or "transpose" in info["op_name"]:
        return "copies and layout changes"
    return "other: " + (info["op_name"].rsplit("/", 1)[-1] or info["opcode"])


def thunk_self_times(trace_dir: str) -> dict[str, float]:
    """hlo_op -> summed self time in seconds over every thunk event of the newest trace under trace_dir."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                  key=os.path.getmtime)[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {}):
            by_thread[(e["pid"], e["tid"])].append((float(e["ts"]), float(e["dur"]), e["args"]["hlo_op"]))
    totals = collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda x: (x[0], -x[1]))
        stack: list[list] = []  # [end, name, child time]
        for ts, dur, name in thread_events:
            while stack and stack[-1][0] <= ts:
                end, outer, children = stack.pop()
                totals[outer] -= children
            if stack:
                stack[-1][2] += dur
            totals[name] += dur
            stack.append([ts + dur, name, 0.0])
        for _, outer, children in stack:
            totals[outer] -= children
    return {name: us / 1e6 for name, us in totals.items()}


def summarize(times: dict[str, float], hlo_text: str, calls: int, top: int = 10) -> dict:
    """Per-call seconds by part and the `top` ops, each with its part, opcode and source."""
    table = hlo_instructions(hlo_text)
    unknown = {"opcode": "?", "op_name": "", "file": "", "line": 0}
    parts = collections.Counter()
    ops = []
    for name, seconds in times.items():
        info = table.get(name, unknown)
        part = part_of(info)
        parts[part] += seconds / calls
        ops.append({"op": name, "seconds": seconds / calls, "part": part, "opcode": info["opcode"],
                    "source": f"{info['file'].split('jaxdpo/')[-1]}:{info['line']}" if info["file"] else "",
                    "jax_op": info["op_name"].rsplit("/", 1)[-1]})
    ops.sort(key=lambda o: -o["seconds"])
    total = sum(parts.values())
    return {"seconds_per_call": total, "parts": dict(parts.most_common()), "top_ops": ops[:top]}


def print_summary(summary: dict) -> None:
    total = summary["seconds_per_call"]
    print(f"profile: {total * 1e3:.1f} ms of thunk self time per call")
    for part, seconds in summary["parts"].items():
        print(f"  {100 * seconds / total:5.1f}%  {seconds * 1e3:9.1f} ms  {part}")
    print("top ops:")
    for o in summary["top_ops"]:
        print(f"  {100 * o['seconds'] / total:5.1f}%  {o['seconds'] * 1e3:9.1f} ms  {o['op']:40s} {o['opcode']:12s} "
              f"{o['jax_op']:24s} {o['part']}  {o['source']}")


def profile_calls(run, hlo_text: str, trace_dir: str, calls: int = 1) -> dict:
    """Trace `calls` calls of `run` (already compiled and warm) into trace_dir; print and return the summary
    (also written to trace_dir/summary.json)."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            run()
    summary = summarize(thunk_self_times(trace_dir), hlo_text, calls)
    print_summary(summary)
    with open(os.path.join(trace_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def profile_decode(model_dir: str, batch: int, new_tokens: int, trace_dir: str, dtype: str = "float32") -> dict:
    """Greedy decode of `batch` chat prompts (tools/bench_generate.py's) for exactly `new_tokens` tokens, one
    call traced after a compiling call; the program's HLO is lowered from the same arguments generate uses."""
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoTokenizer

    from bench_generate import QUESTIONS
    from jaxdpo.models import from_pretrained
    from jaxdpo.sampling import generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [generate.encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(batch)]
    graphdef, state = nnx.split(from_pretrained(model_dir, dtype=getattr(jnp, dtype)))
    settings = generate.SamplingSettings(max_new_tokens=new_tokens)
    run = lambda: generate.generate(graphdef, (state,), prompts, settings, eos_ids=(), pad_id=pad_id)  # noqa: E731
    run()
    program = generate._Program(max_new_tokens=new_tokens, greedy=True, top_k=0, use_top_p=False, eos_ids=(),
                                pad_id=pad_id, decode_contraction_ways=generate._decode_contraction_ways(batch))
    order = sorted(prompts, key=len, reverse=True)
    tokens, lengths = generate.left_pad(order, generate.bucket_length(len(order[0])), pad_id)
    hlo = generate._run_jitted.lower(graphdef, (state,), jnp.asarray(tokens), jnp.asarray(lengths),
                                     jnp.arange(batch, dtype=jnp.int32), jnp.float32(1.0), jnp.float32(1.0),
                                     jnp.uint32(0), program=program).compile().as_text()
    return profile_calls(run, hlo, trace_dir, calls=1)


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("decode",))
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="/tmp/jaxdpo_profile_decode")
    args = parser.parse_args()
    profile_decode(args.model, args.batch, args.new_tokens, args.out, args.dtype)
