#!/usr/bin/env bash
# Run N JAX processes on this machine, each with D simulated CPU devices, joined through a
# coordinator on 127.0.0.1 (collectives over gloo): the multi-host code paths (per-process data
# slices, global arrays from process-local data, process-0-only logging, checkpoints written by
# every process) without a cluster.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-- ] [ARGS...]
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config=configs/dpo.py --config.train.steps=10
#       ARGS starting with "-" go to `python -m jaxdpo.train` (default: --config=configs/dpo.py)
#   launch/local_multiprocess.sh -n 2 python my_check.py
#       ARGS starting with anything else are the whole command, run once per process
#
# Every process gets JAXDPO_COORDINATOR_ADDRESS, JAXDPO_NUM_PROCESSES and JAXDPO_PROCESS_ID (which
# jaxdpo.parallel.distributed.initialize reads), XLA_FLAGS=--xla_force_host_platform_device_count=D and
# JAX_PLATFORMS=cpu. Output lines are prefixed with [pK]; each process's output is also kept in
# LOG_DIR/process_K.log (LOG_DIR defaults to a fresh temp dir, printed at the start).
# If one process fails, the others are stopped (SIGTERM, SIGKILL after STOP_GRACE_S=10 seconds) and
# the script exits with the failed process's status. The trainer's statuses (README, "Exit statuses"):
# 0 finished, 2 config/input/workdir/disk problem, 3 diverged, 75 preempted (SIGTERM / Ctrl-C) with a
# checkpoint saved: rerun the same command to resume.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "local_multiprocess.sh needs bash >= 5.1 (wait -n with pids), this is $BASH_VERSION" >&2; exit 2
fi

num_processes=2
devices_per_process=2
port=""
python="${PYTHON:-python3}"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
need_number() {
  [[ $# -ge 2 && "$2" =~ ^[0-9]+$ && "$2" -ge 1 ]] || { echo "local_multiprocess.sh: $1 needs a positive integer" >&2; exit 2; }
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) need_number "$@"; num_processes="$2"; shift 2 ;;
    -d) need_number "$@"; devices_per_process="$2"; shift 2 ;;
    -p) need_number "$@"; port="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ $# -eq 0 ]]; then
  command=("$python" -m jaxdpo.train --config=configs/dpo.py)
elif [[ "$1" == -* ]]; then
  command=("$python" -m jaxdpo.train "$@")
else
  command=("$@")
fi

if [[ -z "$port" ]]; then  # a port nobody listens on now
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
log_dir="${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/jaxdpo-local-XXXXXX")}"
mkdir -p "$log_dir"
echo "local_multiprocess: $num_processes processes x $devices_per_process CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2
echo "local_multiprocess: ${command[*]}" >&2

pids=()
# SIGTERM first (JAX treats it as a preemption notice and the trainer may save), then SIGKILL after
# a grace period: a process whose peer died may never get past its next collective.
stop_all() {
  local pid waited
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((waited = 0; waited < ${STOP_GRACE_S:-10}; waited++)); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
    [[ -z "$pid" ]] && return 0  # a bare return in a trap handler would return the signal's status
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
# A signal to the script (a scheduler's preemption, Ctrl-C) is passed on to every process: the trainer saves
# and exits 75. The script then exits 75 if every process still running did, else with the first other
# status, so a requeue-on-75 rule sees the preemption.
on_signal() {
  stop_all
  local pid rc final=75
  for pid in "${running[@]}"; do
    if wait "$pid"; then rc=0; else rc=$?; fi
    if [[ $rc -ne 75 && $final -eq 75 ]]; then final=$rc; fi
  done
  echo "local_multiprocess: stopped by a signal; exit status $final" >&2
  exit "$final"
}
running=()
trap on_signal INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export JAXDPO_COORDINATOR_ADDRESS="127.0.0.1:$port" JAXDPO_NUM_PROCESSES="$num_processes" \
           JAXDPO_PROCESS_ID="$i" XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" \
           JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
    # exec: the pid we hold is the process itself, so stop_all reaches it; pipefail keeps its status.
    exec "${command[@]}" > >(tee "$log_dir/process_$i.log" | sed -u "s/^/[p$i] /") 2>&1
  ) &
  pids+=($!)
  running+=($!)
done

# Wait for all; the first failure stops the rest (they would block in collectives until the
# heartbeat timeout otherwise).
status=0
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  if wait -n -p finished "${running[@]}"; then rc=0; else rc=$?; fi
  [[ -n "$finished" ]] || break  # nothing left to wait for
  running=($(printf '%s\n' "${running[@]}" | grep -vx "$finished" || true))
  if [[ $rc -ne 0 ]]; then
    status=$rc
    for ((i = 0; i < num_processes; i++)); do [[ "${pids[$i]}" == "$finished" ]] && break; done
    echo "local_multiprocess: process $i (pid $finished) exited with status $status; stopping the others" >&2
    stop_all
    break
  fi
done
wait || true  # the rest, and the output pipes
exit "$status"
