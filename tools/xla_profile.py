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

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<type>.+?) (?P<opcode>[\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="(?P<op>[^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r'^(\d+) (?:"(?P<text>.*)"|\{(?P<fields>.*)\})$')

# A part of the model -> (file under jaxdpo/, function names: a qualified name or its first component; None = any).
# An instruction belongs to the first part any frame of its call stack matches, in this order.
PARTS = (
    ("LoRA adapters", "models/low_rank.py", ("lora_update", "low_rank", "_low_rank_forward", "_low_rank_backward")),
    ("attention mask", "ops/attention.py", ("make_attention_mask",)),
    ("attention (scores, softmax, PV)", "ops/attention.py", None),
    ("LM head + logsumexp", "ops/logprobs.py", ("_chunk_logits", "_chunk_logprobs", "_chunk_logprobs_and_hidden_grad",
                                                  "_chunk_logprobs_and_logit_grads", "_head_logprobs_bwd",
                                                  "token_logprobs")),
    ("LM head (decode logits)", "models/decoder.py", ("Decoder.head_logits",)),
    ("scored gather, pair sums", "ops/logprobs.py", None),
    ("projections (q,k,v,o, MLP)", "models/decoder.py", ("_contract", "base_weight")),
    ("projections (q,k,v,o, MLP)", "ops/linear.py", None),
    ("embedding", "models/decoder.py", ("embed_tokens",)),
    ("norms, RoPE, residuals, MLP activation", "models/decoder.py", None),
    ("loss", "preference/", None),
    ("decode loop (cache, sampling)", "sampling/generate.py", None),
    ("optimizer (AdamW), gradient sums, finiteness", "training/", None),
)
COPY_OPCODES = {"copy", "transpose"}


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    """The module's FileNames, FunctionNames, FileLocations and StackFrames tables (id -> row text)."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = _TABLE_ROW.match(line) if current is not None else None
        if m:
            current[int(m.group(1))] = m.group("text") if m.group("text") is not None else m.group("fields")
        elif current is not None and line.strip() == "":
            current = None
    return tables


def _fields(row: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", row)}


def call_stacks(hlo_text: str) -> dict[int, list[tuple[str, str, int]]]:
    """stack_frame_id -> its frames (file, function, line), innermost first."""
    t = _tables(hlo_text)
    files, functions = t.get("FileNames", {}), t.get("FunctionNames", {})
    locations = {i: _fields(r) for i, r in t.get("FileLocations", {}).items()}
    frames = {i: _fields(r) for i, r in t.get("StackFrames", {}).items()}
    stacks = {}
    for frame_id in frames:
        stack, seen, current = [], set(), frame_id
        while current in frames and current not in seen:
            seen.add(current)
            loc = locations.get(frames[current]["file_location_id"], {})
            stack.append((files.get(loc.get("file_name_id"), ""), functions.get(loc.get("function_name_id"), ""),
                          loc.get("line", 0)))
            current = frames[current].get("parent_frame_id")
        stacks[frame_id] = stack
    return stacks


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """name -> {opcode, op_name, stack: [(file, function, line)], innermost first} for every instruction of a
    compiled module's text (HLO names its thunks after these instructions)."""
    stacks = call_stacks(hlo_text)
    table = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op, frame = _OP_NAME.search(line), _FRAME_ID.search(line)
        table[m.group("name")] = {"opcode": m.group("opcode"), "op_name": op.group("op") if op else "",
                                  "stack": stacks.get(int(frame.group(1)), []) if frame else []}
    return table


def _names(functions: tuple[str, ...] | None, function: str) -> bool:
    """Whether a PARTS entry's function names cover `function` (a qualified name such as Decoder.head_logits)."""
    return functions is None or function in functions or function.split(".")[0] in functions


def part_of(name: str, info: dict) -> str:
    """The model part an instruction belongs to (PARTS); a fusion that only moves data (XLA names it after
    its copy or transpose) is "copy: " + that part."""
    part = "other: " + (info["op_name"].rsplit("/", 1)[-1] or info["opcode"])
    for label, fragment, functions in PARTS:
        if any(fragment in f and "jaxdpo/" in f and _names(functions, fn) for f, fn, _ in info["stack"]):
            part = label
            break
    moves_data = info["opcode"] in COPY_OPCODES or name.startswith(("copy", "transpose"))
    return "copy: " + part if moves_data else part


def source_of(info: dict) -> str:
    """The innermost jaxdpo frame, as file:line (function)."""
    for f, fn, line in info["stack"]:
        if "jaxdpo/" in f:
            return f"{f.split('jaxdpo/')[-1]}:{line} ({fn})"
    return ""


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
    unknown = {"opcode": "?", "op_name": "", "stack": []}
    parts = collections.Counter()
    ops = []
    for name, seconds in times.items():
        info = table.get(name, unknown)
        part = part_of(name, info)
        parts[part] += seconds / calls
        ops.append({"op": name, "seconds": seconds / calls, "part": part, "opcode": info["opcode"],
                    "source": source_of(info),
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
    with open(os.path.join(trace_dir, "hlo.txt"), "w") as f:
        f.write(hlo_text)
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
    from jaxdpo.sampling import generate, text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [text.encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
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
    parser.add_argument("what", choices=("decode", "summarize"), help="decode: trace generate; summarize: "
                        "read back a trace directory this module wrote (its trace and hlo.txt)")
    parser.add_argument("--model", default="")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="/tmp/jaxdpo_profile_decode")
    parser.add_argument("--calls", type=int, default=1, help="summarize: calls the trace holds")
    args = parser.parse_args()
    if args.what == "summarize":
        print_summary(summarize(thunk_self_times(args.out), open(os.path.join(args.out, "hlo.txt")).read(),
                                args.calls))
    else:
        profile_decode(args.model, args.batch, args.new_tokens, args.out, args.dtype)
