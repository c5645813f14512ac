"""Multi-host start-up: the layout decision (pure) and two real local processes talking over gloo.

The two-process tests run this file as a script (`python tests/test_distributed.py worker ...`), one
process per simulated host with 2 CPU devices each, so the global mesh has 4 devices.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdpo.parallel import distributed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # this file also runs as a worker script (launch/local_multiprocess.sh)
    sys.path.insert(0, REPO_ROOT)
from tests.processes import child_env, free_port  # noqa: E402

# What JAX's coordination service prints when it stops a process whose peer stopped sending heartbeats.
HEARTBEAT_HINTS = ("stopped sending heartbeats", "another task died", "tasks have crashed")

# The end-to-end run: short, eval at the start and the end, no HF export (not what is tested here).

# ---------------------------------------------------------------------------------------------
# plan(): where the layout comes from


def test_plan_single_process_when_nothing_is_set():
    p = distributed.plan({"coordinator_address": "", "num_processes": 0, "process_id": -1,
                          "initialization_timeout": 300}, environ={}, tpu_present=False)
    assert p.source == "single" and not p.is_multi_process
    assert p.heartbeat_timeout == distributed.DEFAULT_HEARTBEAT_TIMEOUT_S


def test_plan_config_wins_over_environment():
    env = {"JAXDPO_COORDINATOR_ADDRESS": "10.0.0.9:1", "JAXDPO_NUM_PROCESSES": "8", "JAXDPO_PROCESS_ID": "5"}
    p = distributed.plan({"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                          "initialization_timeout": 30, "heartbeat_timeout": 7}, environ=env, tpu_present=False)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("config", "10.0.0.1:1234", 4, 2)
    assert (p.initialization_timeout, p.heartbeat_timeout) == (30, 7)


def test_plan_environment_fills_unset_fields():
    env = {"JAXDPO_COORDINATOR_ADDRESS": "127.0.0.1:5000", "JAXDPO_NUM_PROCESSES": "2", "JAXDPO_PROCESS_ID": "1"}
    p = distributed.plan({"coordinator_address": "", "num_processes": 0, "process_id": -1}, environ=env,
                         tpu_present=False)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("env", "127.0.0.1:5000", 2, 1)
    mixed = distributed.plan({"process_id": 0}, environ=env, tpu_present=False)
    assert (mixed.source, mixed.process_id, mixed.num_processes) == ("config+env", 0, 2)


def test_plan_slurm_and_tpu_are_left_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    p = distributed.plan({}, environ=slurm, tpu_present=False)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("slurm", None, None, None)
    assert distributed.plan({}, environ={"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}, tpu_present=False).source \
        == "single"
    assert distributed.plan({}, environ={}, tpu_present=True).source == "tpu"
    assert distributed.plan({}, environ={"TPU_WORKER_HOSTNAMES": "h0,h1"}).source == "tpu"


def test_plan_slurm_one_task_per_node_sees_every_gpu_of_its_node():
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    per_node = {**step, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert distributed.plan({}, environ=per_node, tpu_present=False).local_device_ids == (0, 1, 2, 3)
    by_count = {**step, "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert distributed.plan({}, environ=by_count, tpu_present=False).local_device_ids == tuple(range(8))
    per_gpu = {**per_node, "SLURM_NTASKS": "8"}  # 4 tasks per node: JAX's one-GPU-per-task default
    assert distributed.plan({}, environ=per_gpu, tpu_present=False).local_device_ids is None
    chosen = {**per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"}  # the user's choice stands
    assert distributed.plan({}, environ=chosen, tpu_present=False).local_device_ids is None


def test_plan_errors_say_what_to_set():
    with pytest.raises(RuntimeError, match="srun"):
        distributed.plan({}, environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, tpu_present=False)
    with pytest.raises(ValueError, match="num_processes and process_id are not.*JAXDPO_NUM_PROCESSES"):
        distributed.plan({"coordinator_address": "h:1"}, environ={}, tpu_present=False)
    with pytest.raises(ValueError, match="process_id=3 is outside 0..1"):
        distributed.plan({"coordinator_address": "h:1", "num_processes": 2, "process_id": 3}, environ={},
                         tpu_present=False)
    with pytest.raises(ValueError, match="no coordinator address"):
        distributed.plan({"num_processes": 2, "process_id": 0}, environ={}, tpu_present=False)
    with pytest.raises(ValueError, match="JAXDPO_PROCESS_ID='one' is not an integer"):
        distributed.plan({}, environ={"JAXDPO_PROCESS_ID": "one"}, tpu_present=False)
    with pytest.raises(ValueError, match="heartbeat_timeout must be a positive"):
        distributed.plan({"heartbeat_timeout": -5}, environ={}, tpu_present=False)


def test_initialize_kwargs_match_this_jax():
    p = distributed.plan({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
                          "heartbeat_timeout": 9, "shutdown_timeout": 11}, environ={}, tpu_present=False)
    kwargs = distributed._initialize_kwargs(p)
    assert kwargs["coordinator_address"] == "h:1" and kwargs["num_processes"] == 2 and kwargs["process_id"] == 0
    assert kwargs["heartbeat_timeout_seconds"] == 9 and kwargs["shutdown_timeout_seconds"] == 11


def test_single_process_initialize_is_a_no_op_and_describe_reports_devices(monkeypatch):
    for name in ("JAXDPO_COORDINATOR_ADDRESS", "JAXDPO_NUM_PROCESSES", "JAXDPO_PROCESS_ID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    distributed.initialize({"coordinator_address": "", "num_processes": 0, "process_id": -1})
    import jax
    assert not jax.distributed.is_initialized()
    assert distributed.is_main_process()
    text = distributed.describe()
    assert "process 0 of 1" in text and f"{jax.device_count()} global" in text and "platform cpu" in text


# ---------------------------------------------------------------------------------------------
# two real processes




def _start_pair(mode: str, heartbeat_timeout: int) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", mode, str(heartbeat_timeout)],
                             env=child_env(port, pid), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for pid in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(returncode, output) per process; kills everything left after `timeout` and fails as a hang."""
    start = time.monotonic()
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            pytest.fail(f"process still running after {timeout}s (hang); output:\n{out[-3000:]}")
        results.append((proc.returncode, out))
    return results


def test_two_processes_agree_on_a_global_reduction():
    results = _finish(_start_pair("ok", heartbeat_timeout=20), timeout=120)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    lines = [[line for line in out.splitlines() if line.startswith("RESULT")] for _, out in results]
    assert lines[0] == lines[1] and len(lines[0]) == 1, (lines, results[0][1][-2000:])
    # rows r=0..3 hold r*10 + (0, 1, 2): sum = 10*3*(0+1+2+3) + 4*(0+1+2) = 192; mean = 16; psum of
    # per-device row sums = the same 192.
    assert lines[0][0] == "RESULT sum=192.0 mean=16.0 psum=192.0 processes=2 devices=4"
    assert "process 0 of 2; devices: 2 local, 4 global" in results[0][1]
    assert "process 1 of 2; devices: 2 local, 4 global" in results[1][1]


def test_a_dead_peer_stops_the_survivor_within_bounded_time():
    # a survivor still running after 90 s fails the test as a hang
    (rc0, out0), (rc1, out1) = _finish(_start_pair("peer_dies", heartbeat_timeout=5), timeout=90)
    assert rc1 == 3 and "process 1 exiting without a goodbye" in out1, out1[-2000:]
    # The survivor is stuck waiting for its peer in a collective; the coordination service notices
    # the missing heartbeats and terminates it (SIGABRT), instead of it waiting forever.
    assert rc0 != 0, out0[-3000:]
    assert "survivor finished" not in out0
    assert any(hint in out0 for hint in HEARTBEAT_HINTS), out0[-3000:]


# ---------------------------------------------------------------------------------------------
# launch scripts


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAXDPO_"))}
    env.pop("XLA_FLAGS", None)
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_local_multiprocess_script_runs_processes_that_agree():
    script = os.path.join(REPO_ROOT, "launch", "local_multiprocess.sh")
    done = subprocess.run([script, "-n", "2", "-d", "2", sys.executable, "tests/test_distributed.py", "worker", "ok",
                           "20"], cwd=REPO_ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = sorted(line for line in done.stdout.splitlines() if " RESULT " in line)
    assert results == ["[p0] RESULT sum=192.0 mean=16.0 psum=192.0 processes=2 devices=4",
                       "[p1] RESULT sum=192.0 mean=16.0 psum=192.0 processes=2 devices=4"], done.stdout[-2000:]
    assert "coordinator 127.0.0.1:" in done.stderr


def test_local_multiprocess_script_stops_everyone_when_one_fails():
    script = os.path.join(REPO_ROOT, "launch", "local_multiprocess.sh")
    # heartbeat timeout 60 s: the survivor is stopped by the script, long before JAX would notice
    done = subprocess.run([script, "-n", "2", sys.executable, "tests/test_distributed.py", "worker", "peer_dies", "60"],
                          cwd=REPO_ROOT, env=_clean_env(STOP_GRACE_S="2"), capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "process 1 (pid" in done.stderr and "exited with status 3; stopping the others" in done.stderr
    assert "survivor finished" not in done.stdout
    assert not any(hint in done.stdout for hint in HEARTBEAT_HINTS), done.stdout[-2000:]


def test_local_multiprocess_script_exits_75_when_a_signal_preempts_every_process(tmp_path):
    """A scheduler's SIGTERM to the script reaches every process; they exit 75 (saved) and so does the script."""
    script = os.path.join(REPO_ROOT, "launch", "local_multiprocess.sh")
    preemptible = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); "
                   "print('READY', flush=True); time.sleep(60)")
    proc = subprocess.Popen([script, "-n", "2", sys.executable, "-c", preemptible], cwd=REPO_ROOT,
                            env=_clean_env(LOG_DIR=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    deadline = time.monotonic() + 30
    while not all(log.exists() and "READY" in log.read_text() for log in logs) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    assert "stopped by a signal; exit status 75" in err


def test_tpu_pod_dry_run_prints_every_command():
    script = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
    done = subprocess.run([script, "--dry-run", "--name", "dpo-pod", "--zone", "us-east5-a", "--accelerator-type",
                           "v6e-16", "--config", "configs/ipo.py", "--", "--config.workdir=gs://bucket/run 1",
                           "--config.train.steps=10"], cwd=REPO_ROOT, env=_clean_env(PATH="/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0] == "gcloud compute tpus tpu-vm describe dpo-pod --zone us-east5-a '--format=value(state)'"
    assert commands[1] == ("gcloud compute tpus tpu-vm create dpo-pod --zone us-east5-a --accelerator-type v6e-16 "
                           "--version v2-alpha-tpuv6e")
    assert any(c.startswith("gcloud compute tpus tpu-vm scp ") and c.endswith("--worker=all") for c in commands)
    ssh = [c for c in commands if c.startswith("gcloud compute tpus tpu-vm ssh dpo-pod --zone us-east5-a "
                                               "--worker=all --command ")]
    assert len(ssh) == 2 and "pip install" in ssh[0] and "[tpu]" in ssh[0]
    import shlex
    train = shlex.split(shlex.split(ssh[1])[-1])
    assert train == ["cd", "~/jaxdpo", "&&", "~/jaxdpo-venv/bin/python", "-m", "jaxdpo.train",
                     "--config=configs/ipo.py", "--config.workdir=gs://bucket/run 1", "--config.train.steps=10"]
    assert not os.path.exists("/tmp/jaxdpo-dpo-pod.tar.gz")  # a dry run packs nothing


def test_tpu_pod_rejects_unknown_options_and_missing_configs():
    script = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
    bad = subprocess.run([script, "--dry-run", "--zones", "x"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --zones" in bad.stderr
    missing = subprocess.run([script, "--dry-run", "--config", "configs/nope.py"], cwd=REPO_ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "config configs/nope.py not found" in missing.stderr


def test_launch_scripts_parse():
    for name in ("tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"):
        done = subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, "launch", name)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr}"


# ---------------------------------------------------------------------------------------------
# the worker (runs in the child processes)


def _worker(mode: str, heartbeat_timeout: int) -> None:
    distributed.initialize({"coordinator_address": "", "num_processes": 0, "process_id": -1,
                            "initialization_timeout": 60, "heartbeat_timeout": heartbeat_timeout,
                            "shutdown_timeout": 15})
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdpo.parallel.sharding import make_mesh

    print(distributed.describe(), flush=True)
    mesh = make_mesh(data=2, fsdp=2, tensor=1)  # 4 devices over 2 processes
    rows = P(("data", "fsdp"))
    # Each process holds only its own 2 rows of the global [4, 3] batch: row r = r*10 + (0, 1, 2).
    first_row = 2 * jax.process_index()
    local = np.stack([np.arange(3, dtype=np.float32) + 10 * r for r in (first_row, first_row + 1)])
    batch = jax.make_array_from_process_local_data(NamedSharding(mesh, rows), local)
    assert batch.shape == (4, 3), batch.shape

    if mode == "peer_dies" and jax.process_index() == 1:
        print("process 1 exiting without a goodbye", flush=True)
        os._exit(3)  # a crash: no atexit, no distributed shutdown

    replicated = NamedSharding(mesh, P())
    total, mean = jax.jit(lambda x: (jnp.sum(x), jnp.mean(x)), out_shardings=(replicated, replicated))(batch)

    def per_device_sum(block):  # block: this device's rows
        return jax.lax.psum(jnp.sum(block), ("data", "fsdp"))

    psum = jax.jit(jax.shard_map(per_device_sum, mesh=mesh, in_specs=rows, out_specs=P()))(batch)
    if mode == "peer_dies":  # keep talking to the (dead) peer: this must not hang forever
        for step in range(1000):
            jax.jit(jnp.sum, out_shardings=replicated)(batch + step).block_until_ready()
        print("survivor finished", flush=True)
        return
    print(f"RESULT sum={float(total)} mean={float(mean)} psum={float(psum)} "
          f"processes={jax.process_count()} devices={jax.device_count()}", flush=True)


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], int(sys.argv[3]))
