"""Multi-host start-up: join the other processes of a run before JAX touches any device.

Where the process layout comes from, first match wins:
  1. explicit config (`--config.distributed.coordinator_address=...`, `num_processes`, `process_id`);
  2. environment variables JAXDPO_COORDINATOR_ADDRESS, JAXDPO_NUM_PROCESSES, JAXDPO_PROCESS_ID
     (what `launch/local_multiprocess.sh` sets), filling only the fields the config left unset;
  3. a detected cluster (Cloud TPU VM, SLURM step with several tasks, Open MPI job): JAX's own
     cluster detection fills whatever is still unset;
  4. nothing found: a single process, nothing to do.

A peer that dies must not leave the others waiting forever inside a collective: the coordination
service declares a process dead after `heartbeat_timeout` seconds without a heartbeat and then
terminates every surviving process (XLA aborts them with a message naming the dead task).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import inspect
import json
import os
from collections.abc import Mapping

import jax
import numpy as np

ENV_COORDINATOR_ADDRESS = "JAXDPO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXDPO_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDPO_PROCESS_ID"

# JAX's defaults are 100 s / 300 s. A minute of silence is already far beyond a slow step's
# heartbeat jitter (heartbeats come from a background thread, so long compiles don't delay them),
# and it halves the time a pod burns after one host dies.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# The exit barrier waits for every process to finish (e.g. its last checkpoint write); keep it generous.
DEFAULT_SHUTDOWN_TIMEOUT_S = 300
DEFAULT_INITIALIZATION_TIMEOUT_S = 300

# What JAX's SLURM detection reads; all are set inside an `srun` step, not in the bare batch script.
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do. `source` says why, for the start banner and for error messages."""

    source: str  # "single", "config", "env", "config+env", "slurm", "tpu", "openmpi"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT_S
    local_device_ids: tuple[int, ...] | None = None  # None = JAX's choice

    @property
    def is_multi_process(self) -> bool:
        return self.source != "single"


def _int_or_error(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tpu_present(environ: Mapping[str, str]) -> bool:
    """A Cloud TPU VM (or GKE TPU pod): libtpu is installed and TPU chips or TPU worker variables exist."""
    if any(environ.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return True
    if importlib.util.find_spec("libtpu") is None:
        return False
    # v2-v4 chips appear as /dev/accel*, v5e and newer as numbered /dev/vfio entries.
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _detect_cluster(environ: Mapping[str, str], tpu_present: bool) -> str | None:
    """Name of a cluster environment whose layout JAX can read by itself, or None."""
    slurm_tasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if slurm_tasks and slurm_tasks.isdigit() and int(slurm_tasks) > 1:
        missing = [v for v in _SLURM_STEP_VARS if v not in environ]
        if missing:
            raise RuntimeError(
                f"SLURM job with SLURM_NTASKS={slurm_tasks}, but {', '.join(missing)} not set: this process "
                "was not started by `srun`. Launch every task with `srun python -m jaxdpo.train ...` "
                "(see launch/slurm_gpu.sbatch), or set JAXDPO_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID.")
        return "slurm"
    ompi_size = environ.get("OMPI_COMM_WORLD_SIZE")
    if ompi_size and ompi_size.isdigit() and int(ompi_size) > 1 and "OMPI_MCA_orte_hnp_uri" in environ:
        return "openmpi"
    if tpu_present:
        return "tpu"
    return None


def _slurm_one_task_per_node_gpus(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    """All GPUs of the node when SLURM runs one task per node.

    JAX's SLURM detection gives each process only GPU number SLURM_LOCALID (it assumes one task per
    GPU); with one task per node that would leave all GPUs but one idle. Ids count within
    CUDA_VISIBLE_DEVICES, as CUDA numbers them. None = leave it to JAX (one task per GPU, CPU nodes,
    or JAX_LOCAL_DEVICE_IDS already given).
    """
    nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
    if environ.get("JAX_LOCAL_DEVICE_IDS") or not nodes or environ.get("SLURM_NTASKS") != nodes:
        return None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    gpus_on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    count = len(visible) or (int(gpus_on_node) if gpus_on_node.isdigit() else 0)
    return tuple(range(count)) if count > 1 else None


def _timeouts(dist_cfg: Mapping) -> dict[str, int]:
    """The three timeouts in seconds: the config's where set, the defaults otherwise."""
    timeouts = dict(
        initialization_timeout=int(dist_cfg.get("initialization_timeout") or DEFAULT_INITIALIZATION_TIMEOUT_S),
        heartbeat_timeout=int(dist_cfg.get("heartbeat_timeout") or DEFAULT_HEARTBEAT_TIMEOUT_S),
        shutdown_timeout=int(dist_cfg.get("shutdown_timeout") or DEFAULT_SHUTDOWN_TIMEOUT_S),
    )
    for name, seconds in timeouts.items():
        if seconds <= 0:
            raise ValueError(f"config.distributed.{name} must be a positive number of seconds, got {seconds}")
    return timeouts


def _given_layout(dist_cfg: Mapping, environ: Mapping[str, str]):
    """(coordinator address, process count, process id, where they came from): each field from the
    config if set there, else from its JAXDPO_* environment variable, else None."""
    sources = set()

    def field(value, env_name: str, parse):
        if value is not None:
            sources.add("config")
            return value
        if environ.get(env_name):
            sources.add("env")
            return parse(environ[env_name], env_name)
        return None

    num_processes, process_id = dist_cfg.get("num_processes"), dist_cfg.get("process_id")
    address = field(dist_cfg.get("coordinator_address") or None, ENV_COORDINATOR_ADDRESS, lambda v, _: v)
    num_processes = field(int(num_processes) if num_processes and int(num_processes) > 0 else None,
                          ENV_NUM_PROCESSES, _int_or_error)
    process_id = field(int(process_id) if process_id is not None and int(process_id) >= 0 else None,
                       ENV_PROCESS_ID, _int_or_error)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"distributed.num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"distributed.process_id={process_id} is outside 0..{num_processes - 1} "
            f"(num_processes={num_processes}); give each process a distinct id in that range")
    return address, num_processes, process_id, "+".join(sorted(sources))


def _require_complete(address: str, num_processes, process_id, cluster: str | None) -> None:
    """A coordinator address needs a process count and id, from us or from a detected cluster."""
    missing = [name for name, value in (("num_processes", num_processes), ("process_id", process_id))
               if value is None]
    if not missing or cluster is not None:
        return
    hints = {"num_processes": f"--config.distributed.num_processes or {ENV_NUM_PROCESSES}",
             "process_id": f"--config.distributed.process_id or {ENV_PROCESS_ID}"}
    raise ValueError(
        f"distributed: coordinator_address={address!r} is set but {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not, and no cluster (SLURM, TPU, Open MPI) was "
        f"detected to fill {'it' if len(missing) == 1 else 'them'} in; set "
        + " and ".join(hints[m] for m in missing))


def plan(dist_cfg: Mapping | None, environ: Mapping[str, str] | None = None,
         tpu_present: bool | None = None) -> Plan:
    """Decide how this process joins the run, without touching JAX. Pure apart from the TPU probe.

    `dist_cfg` is `config.distributed` (or a dict) with coordinator_address ("" = unset),
    num_processes (0 = unset), process_id (-1 = unset), initialization_timeout, and optionally
    heartbeat_timeout and shutdown_timeout (seconds).
    """
    dist_cfg = {} if dist_cfg is None else dist_cfg
    environ = os.environ if environ is None else environ
    timeouts = _timeouts(dist_cfg)
    address, num_processes, process_id, source = _given_layout(dist_cfg, environ)
    cluster = _detect_cluster(environ, _tpu_present(environ) if tpu_present is None else tpu_present)
    if address is not None:
        _require_complete(address, num_processes, process_id, cluster)
        return Plan(source, address, num_processes, process_id, **timeouts)
    if cluster == "slurm":
        return Plan(cluster, None, num_processes, process_id, **timeouts,
                    local_device_ids=_slurm_one_task_per_node_gpus(environ))
    if cluster is not None:
        return Plan(cluster, None, num_processes, process_id, **timeouts)
    if num_processes is not None and num_processes > 1:
        raise ValueError(
            f"distributed.num_processes={num_processes} but no coordinator address: set "
            f"--config.distributed.coordinator_address=HOST:PORT (or {ENV_COORDINATOR_ADDRESS}) to the "
            "address of process 0, the same on every process")
    return Plan("single", **timeouts)


def _initialize_kwargs(p: Plan) -> dict:
    """Keyword arguments for jax.distributed.initialize, keeping only those this JAX version accepts
    (the timeout arguments have been renamed before; an unknown one would be a TypeError at start-up)."""
    wanted = dict(
        coordinator_address=p.coordinator_address,
        num_processes=p.num_processes,
        process_id=p.process_id,
        initialization_timeout=p.initialization_timeout,
        heartbeat_timeout_seconds=p.heartbeat_timeout,
        shutdown_timeout_seconds=p.shutdown_timeout,
        local_device_ids=list(p.local_device_ids) if p.local_device_ids else None,
    )
    accepted = inspect.signature(jax.distributed.initialize).parameters
    return {k: v for k, v in wanted.items() if k in accepted and v is not None}


def initialize(dist_cfg: Mapping | None = None) -> None:
    """Join the other processes of this run, or do nothing for a single process (see `plan`).

    Call it first in the program: before jax.devices(), any array, or any mesh. Calling it again is a no-op.
    """
    p = plan(dist_cfg)
    if not p.is_multi_process or jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives over gloo (TCP); without it a multi-process CPU run fails in
    # its first psum. Respect a choice made in the environment (e.g. "mpi").
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**_initialize_kwargs(p))
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "jaxdpo.parallel.distributed.initialize() ran after JAX had already created its devices; call it "
                "at the very start of the program, before jax.devices(), any array, mesh or model") from e
        raise RuntimeError(
            f"joining the multi-process run failed (layout from {p.source}: coordinator="
            f"{p.coordinator_address or 'auto'}, num_processes={p.num_processes or 'auto'}, "
            f"process_id={p.process_id if p.process_id is not None else 'auto'}, "
            f"timeout={p.initialization_timeout}s): {e}. Check that every process got the same coordinator "
            "address and process count, that process 0 is running, and that its port is reachable") from e


def all_processes_agree(flag: bool) -> bool:
    """True only if `flag` on every process, so that all of them take the same branch together."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Every process waits here for the others: what process 0 wrote before it is there for all to read
    (files are written by process 0 alone and read by every process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_jsonl(path: str, records: list) -> None:
    """The one way a file that every process reads is written: process 0 writes the records whole, one JSON
    line each, and renames the file into place (a killed write leaves no partial file); every process calls
    it and returns once the file is there to read."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        os.replace(path + ".tmp", path)
    barrier(f"write {os.path.basename(path)}")


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes metrics and exports."""
    return jax.process_index() == 0


def describe() -> str:
    """One line for the start banner: processes, devices, platform."""
    local = jax.local_devices()
    kind = local[0].device_kind if local else "?"
    return (f"process {jax.process_index()} of {jax.process_count()}; devices: {len(local)} local, "
            f"{jax.device_count()} global; platform {jax.default_backend()} ({kind})")
