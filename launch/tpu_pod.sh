#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) the TPU VM, ship this checkout to every
# worker, install it, and run the same `python -m jaxdpo.train` on all workers at once. JAX finds the
# other workers by itself (jaxdpo.parallel.distributed detects the TPU VM), so no addresses are needed.
#
#   launch/tpu_pod.sh [options] [-- --config.key=value ...]
#
#   launch/tpu_pod.sh --name dpo-v4 --zone us-central2-b --accelerator-type v4-32 \
#       --config configs/dpo.py -- --config.workdir=gs://my-bucket/runs/dpo1 --config.train.steps=2000
#   launch/tpu_pod.sh --dry-run -- --config.train.steps=10      # print every command, run none
#
# Options (or the environment variable in brackets):
#   --name NAME               TPU VM name                        [JAXDPO_TPU_NAME, default jaxdpo]
#   --zone ZONE               GCP zone                           [JAXDPO_TPU_ZONE, default us-central2-b]
#   --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v6e-16  [JAXDPO_TPU_TYPE, default v4-8]
#   --runtime-version VER     TPU VM image [JAXDPO_TPU_RUNTIME, default chosen from the accelerator type]
#   --project PROJECT         GCP project [JAXDPO_GCP_PROJECT, default gcloud's configured project]
#   --spot                    create a Spot VM (cheaper, can be preempted; resume with the same command)
#   --config PATH             config file relative to the repo     [default configs/dpo.py]
#   --skip-install            reuse the code and virtualenv already on the workers
#   --dry-run                 print the commands instead of running them
#
# On more than one worker, --config.workdir must be storage every worker sees (gs://...), or each
# worker writes its own checkpoints. The model and data paths must exist on every worker too (the
# bundled demo assets travel with the checkout). Interrupting this script stops the ssh sessions; the
# remote runs go on unless killed (`gcloud compute tpus tpu-vm ssh NAME --worker=all --command
# "pkill -f jaxdpo.train"`). The script exits with the trainer's status (README, "Exit statuses"): 75
# means preempted (a Spot VM reclaimed, a maintenance event) with a checkpoint saved: run the same
# command again to resume; 0 finished; 2 a config/input/workdir/disk problem; 3 diverged.
set -euo pipefail

name="${JAXDPO_TPU_NAME:-jaxdpo}"
zone="${JAXDPO_TPU_ZONE:-us-central2-b}"
accelerator_type="${JAXDPO_TPU_TYPE:-v4-8}"
runtime_version="${JAXDPO_TPU_RUNTIME:-}"
project="${JAXDPO_GCP_PROJECT:-}"
config="configs/dpo.py"
spot=0
skip_install=0
dry_run=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator_type="$2"; shift 2 ;;
    --runtime-version) need_value "$@"; runtime_version="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    --config.*) break ;;  # train overrides may also come without the `--` separator
    *) echo "tpu_pod.sh: unknown option $1 (train overrides go after --; see --help)" >&2; exit 2 ;;
  esac
done
overrides=("$@")

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$repo_root/$config" ]]; then
  echo "tpu_pod.sh: config $config not found under $repo_root (give a path relative to the repo)" >&2
  exit 2
fi

# Each TPU generation has its own VM image; these are Google's base images for them.
if [[ -z "$runtime_version" ]]; then
  case "$accelerator_type" in
    v5litepod-*|v5e-*) runtime_version="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime_version="v2-alpha-tpuv5" ;;
    v6e-*) runtime_version="v2-alpha-tpuv6e" ;;
    *) runtime_version="tpu-ubuntu2204-base" ;;
  esac
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
location=(--zone "$zone")
[[ -n "$project" ]] && location+=(--project "$project")

# One shell word, single-quoted when it needs quoting, so printed commands can be pasted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Print a command (quoted); run it unless --dry-run.
run() {
  printf '+'; for word in "$@"; do printf ' '; quote "$word"; done; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

# 1. The TPU VM: reuse it when it exists, else create it.
if [[ $dry_run == 1 ]]; then
  run "${gcloud_tpu[@]}" describe "$name" "${location[@]}" '--format=value(state)'
  echo "# if the describe above fails (no such TPU VM), it is created:"
  exists=0
elif "${gcloud_tpu[@]}" describe "$name" "${location[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $name in $zone"
  exists=1
else
  exists=0
fi
if [[ $exists == 0 ]]; then
  create=("${gcloud_tpu[@]}" create "$name" "${location[@]}" --accelerator-type "$accelerator_type"
          --version "$runtime_version")
  [[ $spot == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

ssh_all=("${gcloud_tpu[@]}" ssh "$name" "${location[@]}" --worker=all)

# 2. Ship this checkout (tracked and untracked-but-not-ignored files, so local edits travel) and
#    install it into a Python 3.11+ virtualenv (TPU VM images ship an older python; uv fetches one).
if [[ $skip_install == 0 ]]; then
  bundle="/tmp/jaxdpo-${name}.tar.gz"
  if [[ $dry_run == 1 ]]; then
    echo "+ (cd $(quote "$repo_root") && git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$bundle") --null -T -)"
  else
    echo "+ packing $repo_root into $bundle"
    (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard | tar -czf "$bundle" --null -T -)
  fi
  run "${gcloud_tpu[@]}" scp "$bundle" "$name:jaxdpo.tar.gz" "${location[@]}" --worker=all
  # Unpacked over any previous copy: a relative workdir (runs/...) inside it survives a reinstall.
  install='set -e; mkdir -p ~/jaxdpo && tar -xzf ~/jaxdpo.tar.gz -C ~/jaxdpo'
  install+=' && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --python 3.11 --allow-existing ~/jaxdpo-venv'
  install+=' && VIRTUAL_ENV="$HOME/jaxdpo-venv" ~/.local/bin/uv pip install -q -e "$HOME/jaxdpo[tpu]"'
  run "${ssh_all[@]}" --command "$install"
fi

# 3. The same training command on every worker.
# (~ stays literal here and is expanded by the remote shell; the arguments are quoted for it.)
remote="cd ~/jaxdpo && ~/jaxdpo-venv/bin/python -m jaxdpo.train"
for word in "--config=$config" "${overrides[@]}"; do remote+=" $(quote "$word")"; done
run "${ssh_all[@]}" --command "$remote"
