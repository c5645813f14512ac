"""Device memory of the reference model in `device` vs `host` mode, from the compiled train step.

    python tools/reference_memory.py --model=PATH --data=TRAIN.jsonl [--devices=8 --fsdp=8]
    python tools/reference_memory.py --tiny=/tmp/refmem --layers=8 --hidden=256   # builds a random Llama

Compiles (does not run) the train step of the same model twice and prints XLA's memory analysis and
where the reference's bytes are, per device. On CPU, XLA reports host-memory arguments inside
`argument_size_in_bytes` (it has one memory); the reference rows below come from the argument
placement the program was compiled with, which is what moves to host memory on GPU/TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="Hugging Face checkpoint directory (with its tokenizer)")
    parser.add_argument("--data", default="", help="a preference .jsonl (prompt/chosen/rejected)")
    parser.add_argument("--tiny", default="", help="build a random Llama + data under this directory instead")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
    parser.add_argument("--data-axis", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=-1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the reports to this file")
    args = parser.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and "device_count" not in flags:
        os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={args.devices} "
                                   "--xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    from jaxdpo.training import batches, build
    from tools.memory_report import reference_memory_report

    if args.tiny:
        args.model, args.data = make_tiny_assets(args.tiny, hidden=args.hidden, layers=args.layers)
    reports = []
    for mode in ("device", "host"):
        config = run_config(args, mode, workdir=os.path.join(args.tiny or "/tmp", f"refmem_{mode}"))
        mesh = build.make_mesh(config)
        data = build.build_data(config, mesh)
        policy = build.build_policy(config, mesh, resuming=False)
        reference = build.build_reference(config, mesh, policy, data)
        steps = build.build_steps(config, mesh, policy, reference, data)
        state = build.train_state(policy, steps, resuming=False)
        batch = batches.train_batch(data.batcher, reference, 0, steps.train_batch_shardings)
        report = reference_memory_report(steps.train_step, state, policy.frozen, reference.params, batch,
                                         mode=reference.mode, streams_layers=reference.streams_layers)
        report["mesh"] = dict(mesh.shape)
        reports.append(report)
    print(format_reports(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return reports


def make_tiny_assets(root: str, *, hidden: int, layers: int) -> tuple[str, str]:
    """(model dir, train file): a random Llama, its tokenizer and 64 demo pairs under `root` (kept)."""
    from tools import make_demo_assets as demo

    model_dir, data_file = os.path.join(root, "model"), os.path.join(root, "train.jsonl")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        rows, _ = demo.make_data(seed=1, n_train=64, n_eval=0)
        demo.write_jsonl(data_file, rows)
        tokenizer = demo.train_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 300)
        model = demo.build_model(tokenizer, seed=0, hidden=hidden, layers=layers, heads=4, kv_heads=2,
                                 intermediate=2 * hidden)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir, data_file


def run_config(args, mode: str, *, workdir: str):
    """configs/dpo.py on the given model and data, with the reference in `mode`, compiled only."""
    from configs import dpo

    c = dpo.get_config()
    c.workdir, c.model.path, c.data.train_files, c.data.eval_files = workdir, args.model, args.data, ""
    c.data.max_length, c.data.max_prompt_length, c.data.cache_dir = 48, 24, os.path.join(workdir, "cache")
    c.train.batch_size = c.train.micro_batch_size = c.train.eval_batch_size = 8
    c.train.steps = 3
    c.reference.mode = mode
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = args.data_axis, args.fsdp, args.tensor
    return c


def format_reports(reports: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:9.3f} MiB"
    rows = [("per device", *[r["mode"] for r in reports])]
    for key in reports[0]["memory_analysis"]:
        rows.append((f"XLA {key}", *[mib(r["memory_analysis"][key]) for r in reports]))
    for key in ("reference_device_bytes", "reference_host_bytes", "reference_streamed_bytes"):
        rows.append((key, *[mib(r[key]) for r in reports]))
    rows.append(("HLO entry params in host memory", *[str(r["hlo_host_params"]) for r in reports]))
    rows.append(("HLO host-memory param bytes", *[mib(r["hlo_host_param_bytes"]) for r in reports]))
    rows.append(("XLA argument bytes in device memory", *[
        mib(r["memory_analysis"]["argument_size_in_bytes"] - r["hlo_host_param_bytes"]) for r in reports]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>14}" for c in r[1:]) for r in rows)


if __name__ == "__main__":
    main()
