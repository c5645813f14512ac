"""Helpers for tests that start several local JAX processes (a coordinator on 127.0.0.1, gloo)."""

import os
import socket

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(port: int, process_id: int, *, num_processes: int = 2, local_devices: int = 2) -> dict:
    """The environment of one process of a local multi-process run, free of cluster variables that
    would make jaxdpo.parallel.distributed auto-detect SLURM/MPI/TPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "PMI_"))}
    # the scheduler flag: see DEVELOPING.md "CPU collectives"
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} "
                         "--xla_cpu_enable_concurrency_optimized_scheduler=false",
               JAX_PLATFORMS="cpu", JAXDPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAXDPO_NUM_PROCESSES=str(num_processes), JAXDPO_PROCESS_ID=str(process_id),
               PYTHONUNBUFFERED="1",
               # children may run a test file as a script: let it import `tests.*` and `configs`
               PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    return env
