"""Turn a jaxdpo training checkpoint into a Hugging Face model directory that transformers loads.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--step N] [--tokenizer DIR] [--dtype bfloat16]

CHECKPOINT is a run's WORKDIR, its WORKDIR/checkpoints, or one step directory in it (default: the newest
step). Only the policy params are read (not the optimizer state), onto one device, so a checkpoint of a
run sharded over a pod converts on a laptop if the weights fit in its memory. The architecture comes from
the checkpoint's own meta (the run's fingerprint holds the ModelConfig), so the original model directory
is not needed for a full fine-tune. A LoRA run's checkpoint holds only the adapters: they are merged into
the base weights read from the run's model.path (recorded in the meta; `--base DIR` overrides it).

The tokenizer is copied from `--tokenizer`, else WORKDIR/hf (the run's own export), else the run's
model.tokenizer / model.path; without any, the model is written alone (with a warning).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `jaxdpo` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdpo.checkpoint.saved_policy import (
    DTYPES,
    build_model,
    find_tokenizer,
    locate,
    read_params,
)
from jaxdpo.errors import ConfigError
from jaxdpo.models import save_pretrained
from jaxdpo.models.lora import merge_adapters

__all__ = ["ConfigError", "convert", "locate", "main"]


def convert(checkpoint: str, out_dir: str, *, step: int | None = None, tokenizer: str | None = None,
            base: str | None = None, dtype: str | None = None) -> int:
    """Write OUT_DIR; returns the step converted."""
    checkpoints_dir, step, workdir = locate(checkpoint, step)
    params, meta = read_params(checkpoints_dir, step)
    model, lora = build_model(params, meta, base=base)
    if lora is not None:
        model = merge_adapters(model, lora)
    tok = find_tokenizer(workdir, meta, tokenizer)
    if tok is None:
        print("convert_to_hf: no tokenizer found (pass --tokenizer DIR); writing the model without one",
              file=sys.stderr)
    save_pretrained(model, out_dir, tokenizer=tok, dtype=DTYPES[dtype] if dtype else None)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="WORKDIR, WORKDIR/checkpoints, or one step directory in it")
    parser.add_argument("out_dir", help="where to write config.json, *.safetensors and the tokenizer")
    parser.add_argument("--step", type=int, default=None, help="which step (default: the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: see above)")
    parser.add_argument("--base", default=None, help="LoRA runs: the base model directory (default: model.path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype on disk (default: the run's model.param_dtype)")
    args = parser.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax narrates read-only opens at WARNING; nothing to act on
    try:
        step = convert(args.checkpoint, args.out_dir, step=args.step, tokenizer=args.tokenizer, base=args.base,
                       dtype=args.dtype)
    except ConfigError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote step {step} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
