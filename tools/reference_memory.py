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
    from jaxdpo.reference import reference_memory_report
    from jaxdpo.trainer import Trainer
    from tests.tiny_assets import make_llama, make_tokenizer, preference_rows, tiny_run_config

    if args.tiny:
        model_dir, data_file = os.path.join(args.tiny, "model"), os.path.join(args.tiny, "train.jsonl")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            rows = preference_rows(64, seed=1)
            os.makedirs(args.tiny, exist_ok=True)
            with open(data_file, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            tokenizer = make_tokenizer(model_dir, [r[k] for r in rows for k in ("prompt", "chosen", "rejected")])
            make_llama(model_dir, tokenizer, hidden=args.hidden, layers=args.layers)
        args.model, args.data = model_dir, data_file
    reports = []
    for mode in ("device", "host"):
        workdir = os.path.join(args.tiny or "/tmp", f"refmem_{mode}")
        config = tiny_run_config({"model": args.model, "train": args.data, "eval": ""}, workdir, **{
            "reference.mode": mode, "mesh.data": args.data_axis, "mesh.fsdp": args.fsdp,
            "mesh.tensor": args.tensor, "data.eval_files": ""})
        trainer = Trainer(config)
        trainer.build_data()
        trainer.build_model()
        trainer.build_reference()
        trainer.build_steps()
        report = reference_memory_report(trainer)
        report["mesh"] = dict(trainer.mesh.shape)
        reports.append(report)
    print(format_reports(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return reports


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
