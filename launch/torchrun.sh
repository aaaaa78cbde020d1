#!/usr/bin/env bash
# torchrun.sh: launch latentwire/train.py with torchrun on one node or many (c10d rendezvous).
#
# Example:
#   launch/torchrun.sh --auto_resume --save_dir runs/exp1 --epochs 10                  # this node, every GPU
#   NNODES=2 RDZV_ENDPOINT=node1:29500 RDZV_ID=exp1 launch/torchrun.sh --auto_resume --save_dir /shared/runs/exp1
#   launch/torchrun.sh --dry-run --nproc-per-node 4 --auto_resume --save_dir runs/exp1  # print the command only
#
# Usage: torchrun.sh [--nnodes N] [--nproc-per-node N] [--rdzv-endpoint HOST:PORT] [--rdzv-id ID]
#                    [--max-restarts K] [--dry-run] [TRAIN.PY ARGS...] [-- TRAIN.PY ARGS...]
#
# Each setting is a flag or an environment variable (the flag wins):
#   NNODES          nodes taking part (default 1); run this script on every node with the same settings
#   NPROC_PER_NODE  workers per node (default: the GPUs visible here, from CUDA_VISIBLE_DEVICES or
#                   nvidia-smi; 1 without GPUs)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, reachable from every node (default localhost:29500)
#   RDZV_ID         rendezvous id, the same on every node of a job (default: SLURM_JOB_ID, PBS_JOBID,
#                   LSB_JOBID or JOB_ID if set, else 'latentwire')
#   MAX_RESTARTS    torchrun's own worker restarts (default 0); a restart reruns the same command, so
#                   pass --auto_resume to make it continue from the latest checkpoint
#   PYTHON          the interpreter (default: python from PATH)
# It prints the command, then replaces itself with torchrun (signals reach torchrun, which passes them to
# the workers). Exit status is torchrun's: 0 finished; a preemption (workers exit 143) is reported as 1.
# Every other argument goes to latentwire/train.py. Works from any directory.

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    local n=0 d; IFS=, read -ra d <<< "$CUDA_VISIBLE_DEVICES"
    for x in "${d[@]}"; do [ -n "$x" ] && [ "$x" != -1 ] && n=$((n + 1)); done
    echo "$n"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU'
  else
    echo 0
  fi
}

DRY_RUN=0 ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nnodes|--nproc-per-node|--rdzv-endpoint|--rdzv-id|--max-restarts)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      case "$1" in
        --nnodes) NNODES="$2" ;; --nproc-per-node) NPROC_PER_NODE="$2" ;;
        --rdzv-endpoint) RDZV_ENDPOINT="$2" ;; --rdzv-id) RDZV_ID="$2" ;; --max-restarts) MAX_RESTARTS="$2" ;;
      esac
      shift ;;
    --) shift; ARGS+=("$@"); break ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

NNODES="${NNODES:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(gpus)"; [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-${PBS_JOBID:-${LSB_JOBID:-${JOB_ID:-latentwire}}}}}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
PY="${PYTHON:-python}"

[[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "NNODES '$NNODES': a number of nodes, or MIN:MAX"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE '$NPROC_PER_NODE': must be a number >= 1"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS '$MAX_RESTARTS': must be a number >= 0"
[[ "$RDZV_ENDPOINT" == *:* ]] || die "RDZV_ENDPOINT '$RDZV_ENDPOINT': must be HOST:PORT"
if [ "$MAX_RESTARTS" -gt 0 ]; then
  case " ${ARGS[*]-} " in
    *" --auto_resume "*) ;;
    *) echo "torchrun.sh: warning: MAX_RESTARTS=$MAX_RESTARTS without --auto_resume: a restart starts training over" >&2 ;;
  esac
fi

CMD=("$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" --max_restarts "$MAX_RESTARTS"
     "$ROOT/latentwire/train.py" ${ARGS[@]+"${ARGS[@]}"})
printf '%q ' "${CMD[@]}"; echo
[ "$DRY_RUN" = 1 ] && exit 0
command -v "$PY" >/dev/null 2>&1 || die "no python: '$PY' is not on PATH (set PYTHON=/path/to/python)"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
exec "${CMD[@]}"
