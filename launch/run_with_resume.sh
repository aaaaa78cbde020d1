#!/usr/bin/env bash
# run_with_resume.sh: run latentwire's trainer (or main experiment) and restart it with resume when it dies.
#
# Example:
#   launch/run_with_resume.sh train --save-dir runs/exp1 --epochs 20 --save_every 100
#   launch/run_with_resume.sh train --resume --save-dir runs/exp1 --nproc 2
#   launch/run_with_resume.sh main --resume --compression-type telepathy --save-dir runs/main
#
# Usage: run_with_resume.sh {train|main} [--resume] [--save-dir DIR] [--nproc N] [--max-restarts K]
#                           [--restart-delay S] [--dry-run] [PROGRAM ARGS...] [-- PROGRAM ARGS...]
#
#   train            latentwire/train.py; gets --save_dir DIR, plus --auto_resume with --resume or on a restart
#   main             latentwire/main_experiment.py; gets --save-dir DIR, plus --resume likewise
#   --resume         resume from the latest complete checkpoint in DIR from the first attempt on
#   --save-dir DIR   checkpoint directory (default: the program's own, runs/latentwire or runs/main_experiment)
#   --nproc N        1 (default): plain python; N > 1: python -m torch.distributed.run --standalone --nproc_per_node N
#   --max-restarts K restart a failed or killed run at most K times (default 3)
#   --restart-delay S  seconds to wait before each restart (default 0)
#   --dry-run        print the first command and exit
#   Every other argument (and everything after --) goes to the program unchanged; --help before -- shows
#   this text (the program's own: python latentwire/train.py --help).
#
# Output (stdout and stderr of the wrapper and the program) is also appended to DIR/logs/run_with_resume.log.
# A non-zero exit or a kill of the program (kill -9, OOM killer) restarts it with resume. Flags that only
# make sense for the first attempt are dropped on restarts, which continue from the newest checkpoint in DIR:
# train's --resume_from PATH, --reset_epoch, --no_load_optimizer, --no_load_lr_scheduler; main's --resume-from PATH.
# SIGTERM, SIGINT or SIGUSR1 sent to this script are forwarded to the program's process group (torchrun
# passes them on to its workers); the script waits for the program and exits with its status without
# restarting: a preempted job should stop and let the scheduler requeue it.
#
# Exit status: 0 finished; otherwise the program's last status (143: preempted with a checkpoint, rerun with
# --resume; under --nproc > 1 torchrun reports a preemption as 1) or 2 for a usage error of this script.
# Uses $PYTHON if set, else python from PATH; works from any directory (the repo is found from this file).

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="run_with_resume"

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "$ME: error: $*" >&2; echo "$ME: see: $0 --help" >&2; exit 2; }

[ $# -gt 0 ] || { usage >&2; exit 2; }
case "$1" in
  -h|--help) usage; exit 0 ;;
  train) PROGRAM="$ROOT/latentwire/train.py"; SAVE_FLAG=--save_dir; RESUME_FLAG=--auto_resume
         SAVE_DIR=runs/latentwire ;;
  main) PROGRAM="$ROOT/latentwire/main_experiment.py"; SAVE_FLAG=--save-dir; RESUME_FLAG=--resume
        SAVE_DIR=runs/main_experiment ;;
  *) die "unknown subcommand '$1': use 'train' (latentwire/train.py) or 'main' (latentwire/main_experiment.py)" ;;
esac
MODE="$1"; shift

RESUME=0 NPROC=1 MAX_RESTARTS=3 RESTART_DELAY=0 DRY_RUN=0
PASS=()        # arguments for the program, first attempt
RESTART=()     # the same without the first-attempt-only flags
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 '$2': must be a whole number >= 0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --resume) RESUME=1 ;;
    --save-dir) need "$@"; SAVE_DIR="$2"; shift ;;
    --save-dir=*) SAVE_DIR="${1#*=}"; [ -n "$SAVE_DIR" ] || die "--save-dir needs a value" ;;
    --nproc) need "$@"; NPROC="$2"; shift ;;
    --nproc=*) NPROC="${1#*=}" ;;
    --max-restarts) need "$@"; MAX_RESTARTS="$2"; shift ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --restart-delay) need "$@"; RESTART_DELAY="$2"; shift ;;
    --restart-delay=*) RESTART_DELAY="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; PASS+=("$@"); RESTART+=("$@"); break ;;
    *)
      case "$MODE:$1" in
        train:--auto_resume) RESUME=1 ;;
        train:--save_dir|train:--save_dir=*) die "pass the checkpoint directory as --save-dir DIR (this script adds --save_dir)" ;;
        train:--resume_from|main:--resume-from)  # first attempt only
          need "$@"; PASS+=("$1" "$2"); shift ;;
        train:--resume_from=*|main:--resume-from=*|train:--reset_epoch|train:--no_load_optimizer|train:--no_load_lr_scheduler)
          PASS+=("$1") ;;
        *) PASS+=("$1"); RESTART+=("$1") ;;
      esac ;;
  esac
  shift
done
int --nproc "$NPROC"; int --max-restarts "$MAX_RESTARTS"; int --restart-delay "$RESTART_DELAY"
[ "$NPROC" -ge 1 ] || die "--nproc $NPROC: must be >= 1"
if [ "$MODE" = train ] && [ "$RESUME" = 1 ]; then
  for a in ${PASS[@]+"${PASS[@]}"}; do
    case "$a" in --resume_from|--resume_from=*) die "--resume and --resume_from both given; pick one" ;; esac
  done
fi

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || die "no python: '$PY' is not on PATH (set PYTHON=/path/to/python)"
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$PROGRAM")
else
  LAUNCH=("$PY" "$PROGRAM")
fi

command_for() {  # $1: attempt number (0 = first); sets CMD
  if [ "$1" -eq 0 ]; then
    CMD=("${LAUNCH[@]}" "$SAVE_FLAG" "$SAVE_DIR")
    [ "$RESUME" = 1 ] && CMD+=("$RESUME_FLAG")
    CMD+=(${PASS[@]+"${PASS[@]}"})
  else
    CMD=("${LAUNCH[@]}" "$SAVE_FLAG" "$SAVE_DIR" "$RESUME_FLAG" ${RESTART[@]+"${RESTART[@]}"})
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  command_for 0
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

# --- from here on everything is also appended to the log ------------------------------------------------
LOG_DIR="$SAVE_DIR/logs"
LOG="$LOG_DIR/run_with_resume.log"
# Never append through a planted link or into a FIFO (tee would follow the one and block on the other).
for f in "$LOG_DIR" "$LOG"; do
  [ -L "$f" ] && die "$f is a symlink to $(readlink "$f"); the log is written only inside the save_dir: remove it"
done
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"
if [ -e "$LOG" ] && [ ! -f "$LOG" ]; then die "$LOG is not a regular file (a FIFO, device or directory): remove it"; fi
exec 3>&1 4>&2
# tee ignores the signals so that a Ctrl+C to the terminal cannot cut the log short.
exec > >(exec 3>&- 4>&-; trap '' INT TERM USR1 HUP; exec tee -a "$LOG") 2>&1
TEE_PID="${!:-}"  # bash >= 4.4 reports the pid of a process substitution
export PYTHONUNBUFFERED=1

say() { echo "[$ME $(date '+%Y-%m-%d %H:%M:%S')] $*"; }
describe() {  # an exit status in words
  if [ "$1" -eq 143 ]; then echo "143 (preempted, or killed by SIGTERM)"
  elif [ "$1" -gt 128 ] && [ "$1" -lt 160 ]; then
    echo "$1 (killed by SIG$(kill -l "$(($1 - 128))" 2>/dev/null || echo "?"))"
  else echo "$1"; fi
}
finish() {  # restore the terminal, let tee drain (bounded: an orphan could hold the pipe), exit
  exec 1>&3 2>&4 3>&- 4>&-
  for _ in $(seq 50); do [ -n "$TEE_PID" ] && kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  exit "$1"
}

# Job control: the program gets its own process group, so a signal for the wrapper's group (Ctrl+C in a
# terminal) reaches it once, through forward(), and a whole torchrun group can be signalled.
set -m
CHILD="" SIGNALLED=""
forward() {
  SIGNALLED="$1"
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
    say "received SIG$1: forwarding it to the program (pid $CHILD) and waiting for it; no restart after this"
    kill -s "$1" -- "-$CHILD" 2>/dev/null || kill -s "$1" "$CHILD" 2>/dev/null
  else
    say "received SIG$1 with no program running: stopping"
  fi
}
for sig in TERM INT USR1; do trap "forward $sig" "$sig"; done

# Workers of a torchrun whose launcher was killed run on in their own sessions; every process of an
# attempt carries a tag in its environment, so leftovers can be found and killed before the next attempt.
TAG_BASE="$$.$(date +%s%N)"
kill_leftovers() {
  local files pids
  # (grep exits 2 when some environ cannot be read, even with matches: look at its output only)
  files=$(grep -lzx "RUN_WITH_RESUME_TAG=$1" /proc/[0-9]*/environ 2>/dev/null)
  pids=$(echo "$files" | sed -n 's|^/proc/\([0-9]*\)/environ$|\1|p' | grep -vx "$$")
  [ -n "$pids" ] || return 0
  say "killing leftover processes of the last attempt: $(echo $pids)"
  kill -9 $pids 2>/dev/null
}

attempt=0 code=0
while :; do
  command_for "$attempt"
  say "attempt $((attempt + 1)) of at most $((MAX_RESTARTS + 1)): $(printf '%q ' "${CMD[@]}")"
  TAG="$TAG_BASE.$attempt"
  RUN_WITH_RESUME_TAG="$TAG" "${CMD[@]}" 3>&- 4>&- &
  CHILD=$!
  while :; do
    wait "$CHILD"; code=$?
    # wait also returns (>128) when a trapped signal arrives; the program may still be running.
    kill -0 "$CHILD" 2>/dev/null || break
  done
  CHILD=""
  kill_leftovers "$TAG"
  if [ "$code" -eq 0 ]; then
    say "finished (exit 0)"
    finish 0
  fi
  if [ -n "$SIGNALLED" ]; then
    say "program exited with $(describe "$code") after SIG$SIGNALLED: exiting with it, not restarting" \
        "(rerun with --resume to continue)"
    finish "$code"
  fi
  if [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    say "giving up: the program exited with $(describe "$code") and all $MAX_RESTARTS restarts are used up"
    finish "$code"
  fi
  attempt=$((attempt + 1))
  say "program exited with $(describe "$code"); restart $attempt of $MAX_RESTARTS with $RESUME_FLAG"
  [ "$RESTART_DELAY" -gt 0 ] && { sleep "$RESTART_DELAY" & wait $!; }
  if [ -n "$SIGNALLED" ]; then
    say "received SIG$SIGNALLED before the restart: exiting with $code"
    finish "$code"
  fi
done
