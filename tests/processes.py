"""Helpers for tests that start several local JAX processes (a coordinator on 127.0.0.1, gloo)."""

import os
import socket

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA flags of every test process and JAX child process (device count aside):
# - the concurrency-optimized CPU scheduler can order collectives differently on different simulated
#   devices, which deadlocks (all-reduce rendezvous never completes) on small machines;
# - the suite compiles hundreds of small programs and runs each a few times on tiny models, so compile
#   time is what counts: LLVM's cheapest optimization level and XLA:CPU's older (elemental) fusion emitters
#   compile them several times faster (DEVELOPING.md, "Tests"), and their run time does not matter.
TEST_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_backend_optimization_level=0 "
                  "--xla_cpu_use_fusion_emitters=false")


def jax_env(devices: int) -> dict[str, str]:
    """The environment a JAX child process of the tests runs in: `devices` simulated CPU devices, the same
    XLA flags as the test processes (TEST_XLA_FLAGS) and the session's compilation cache, so that a child
    compiling a program a test (or an earlier child) compiled loads it instead."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
            "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "true",
            "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"],
            "JAX_COMPILATION_CACHE_MAX_SIZE": "-1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            # children may run a test file as a script: let it import `tests.*` and `configs`
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(port: int, process_id: int, *, num_processes: int = 2, local_devices: int = 2) -> dict:
    """The environment of one process of a local multi-process run, free of cluster variables that
    would make jaxdpo.parallel.distributed auto-detect SLURM/MPI/TPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "PMI_"))}
    env.update(jax_env(local_devices), JAXDPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAXDPO_NUM_PROCESSES=str(num_processes), JAXDPO_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    return env
