#!/usr/bin/env bash
# The engine's CUDA paths on one GPU, in under 8 minutes (a hard deadline, GPU_CHECK_BUDGET_S): the pinned host
# staging on a side stream (dcp_resume/staging.py), the device fingerprint (dcp_resume/incremental.py), async and
# incremental saves of CUDA state, and benchmarks/save_latency.py --device cuda under torchrun (NCCL) at two sizes.
#
#   bash benchmarks/gpu_check.sh "$OUT"          # from the repo root; OUT defaults to $OUT, else runs/gpu_check
#
# Steps, each under `timeout` and the overall deadline; a failed step is reported and the next one still runs:
#   1. what is here: python, torch, its CUDA build, the GPU (nvidia-smi, torch). No usable CUDA GPU: one line
#      saying what was found, then exit 0 (nothing else runs).
#   2. the project importable: pip install -e . --no-deps --no-build-isolation when it is not installed, and pip
#      install --no-deps of missing small dependencies (wheels from .whl/ or GPU_CHECK_WHEELS when present);
#      torch is never installed or upgraded. PYTHONPATH is set to the repo either way.
#   3. pytest -m cuda on the modules with CUDA tests (tests/unit/test_cuda_paths.py, test_incremental.py); then
#      a probe of what pinned staging holds in host memory (the pinned allocator rounds blocks up to powers of 2).
#   4. save_latency.py at each size of GPU_CHECK_SIZES (default "256 1024" MB of parameters; the state is ~3x
#      with AdamW), one torchrun --nproc_per_node 1 process each (the NCCL group); checkpoints go to a scratch
#      directory outside OUT (GPU_CHECK_SAVE_DIR, default under TMPDIR), removed after each size. A size whose
#      checkpoints would not fit the free disk is halved until they do.
#   5. one table from the JSON files (benchmarks/_gpu_check_table.py): blocking vs the D2H pinned-copy floor,
#      total vs the write floor; then every step's outcome.
# Outputs (at most 8 files, for the device tool): OUT/gpu_check.log (everything printed), OUT/summary.md (the
# table, the pinned-memory probe and the steps), OUT/save_latency_<MB>/save_latency.{json,md}. Exit status: 0 when
# every step passed (or when there is no GPU: nothing was run), 1 when any step failed, timed out or was skipped.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450), GPU_CHECK_SIZES, GPU_CHECK_METHODS
# (default: every save_latency method but torch_save_rank0), GPU_CHECK_SAVE_DIR, GPU_CHECK_WHEELS.
# FOR TESTING THIS SCRIPT ONLY: GPU_CHECK_ALLOW_CPU=1 runs every step on a machine without a GPU, on CPU, at a
# tiny size (save_latency --device cpu --sizes 16 --repeats 1): it checks the script, not the engine on a GPU.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
[[ $PY == */* && -e $PY ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # steps run from other dirs
BUDGET=${GPU_CHECK_BUDGET_S:-450}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
RESERVE=20  # seconds kept for the table and the summary
SCRATCH=""  # save_latency's checkpoints: removed after each size, and on any exit
STEPS=()    # "name|outcome"

say() { printf 'gpu_check: %s\n' "$*"; }

remaining() { echo $((BUDGET - SECONDS)); }

# run_step NAME WANT_S CMD...: CMD under timeout (at most WANT_S, and never past the deadline); records the outcome.
run_step() {
    local name=$1 want=$2 left t rc start
    shift 2
    left=$(( $(remaining) - RESERVE ))
    t=$(( want < left ? want : left ))
    if (( t < 15 )); then
        say "SKIP $name: out of time (${left}s left before the ${BUDGET}s deadline)"
        STEPS+=("$name|SKIPPED (out of time)")
        return 124
    fi
    say "--- $name (timeout ${t}s, $(( $(remaining) ))s left) ---"
    start=$SECONDS
    timeout -k 10 "$t" "$@"
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        STEPS+=("$name|TIMED OUT after $((SECONDS - start))s")
    elif (( rc != 0 )); then
        STEPS+=("$name|FAILED (exit $rc, $((SECONDS - start))s)")
    else
        STEPS+=("$name|ok ($((SECONDS - start))s)")
    fi
    return $rc
}

# exit 0: a usable CUDA device; 3: no torch; 4: torch without a usable CUDA device
read -r -d '' PROBE <<'EOF'
import platform, sys
where = f"{sys.executable} (Python {platform.python_version()})"
try:
    import torch
except Exception as e:
    print(f"python {where} has no usable torch ({type(e).__name__}: {e})")
    sys.exit(3)
build = torch.version.cuda
if not build or not torch.cuda.is_available():
    why = ("a CPU-only build (torch.version.cuda is None)" if not build else
           f"CUDA {build} build, but torch.cuda.is_available() is False")
    print(f"python {where}, torch {torch.__version__}: {why}")
    sys.exit(4)
nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
print(f"python: {where}")
print(f"torch: {torch.__version__}, CUDA build {build}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs")
EOF

# What pinned staging costs in host memory: tensors of sizes real models have (not powers of two) staged twice;
# the pinned allocator's own count (torch.cuda.host_memory_stats, where this torch has it) against the bytes
# staged, and the second (warm) staging's rate. Writes its line to argv[1] too, for summary.md.
read -r -d '' PINNED <<'EOF'
import sys, time
import torch
from dcp_resume.staging import StagingBuffers
if not torch.cuda.is_available():
    print("pinned staging probe: no CUDA device, nothing to measure")
    sys.exit(0)
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
shapes = [((11008, 4096), torch.bfloat16)] * 4 + [((3000, 4096), torch.float32)] * 4 + [((4096,), torch.float32)] * 8
state = {f"t{i}": torch.randn(shape, device="cuda").to(dtype) for i, (shape, dtype) in enumerate(shapes)}
torch.cuda.synchronize()
buffers, r0 = StagingBuffers(), rss()
t0 = time.perf_counter()
buffers.stage(state)
cold = time.perf_counter() - t0
t0 = time.perf_counter()
buffers.stage(state)
warm = time.perf_counter() - t0
staged = buffers.nbytes()
stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
held = stats.get("allocated_bytes.current")
line = (f"pinned staging probe: {staged / 2**20:.0f} MiB staged in {len(shapes)} tensors; the pinned allocator holds "
        + (f"{held / 2**20:.0f} MiB ({held / staged:.2f}x the bytes staged)" if held else "n/a (no host_memory_stats)")
        + f"; RSS +{(rss() - r0) / 2**20:.0f} MiB; staging cold {cold:.3f} s, warm {warm:.3f} s "
        f"({staged / 1e9 / warm:.1f} GB/s)")
print(line)
with open(sys.argv[1], "w") as f:
    f.write(line + "\n")
EOF

main() {
    trap '[[ -n $SCRATCH ]] && rm -rf "$SCRATCH"' EXIT
    local found rc device sizes methods
    if ! command -v timeout >/dev/null; then
        say "no 'timeout' command here (coreutils): refusing to run steps that could hang"; return 1
    fi
    # 1. what is here
    if ! command -v "$PY" >/dev/null; then
        found="no '$PY' on PATH"
        rc=3
    else
        found=$(timeout -k 5 90 "$PY" -c "$PROBE" 2>&1)
        rc=$?
    fi
    if (( rc != 0 )); then
        local smi
        smi=$(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version \
            --format=csv,noheader 2>/dev/null | head -1)
        found="${found//$'\n'/; }; nvidia-smi: ${smi:-none}"
        if [[ $ALLOW_CPU != 1 || $rc == 3 || $rc == 124 ]]; then
            say "no usable CUDA GPU, skipping every GPU step (exit 0): $found"
            return 0
        fi
        say "no usable CUDA GPU ($found); GPU_CHECK_ALLOW_CPU=1: TESTING THE SCRIPT on CPU at a tiny size"
        device=cpu
        sizes=${GPU_CHECK_SIZES:-16}
    else
        echo "$found"
        command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total \
            --format=csv 2>&1
        device=cuda
        sizes=${GPU_CHECK_SIZES:-256 1024}
    fi
    methods=${GPU_CHECK_METHODS:-dcp_sync dcp_async_thread dcp_async_cached engine_sync engine_async}
    say "repo $REPO, outputs in $OUT_DIR, deadline ${BUDGET}s, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"

    # 2. the project and its small dependencies (never torch)
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    install_deps() {
        local missing=() m installed wheels=${GPU_CHECK_WHEELS:-$REPO/.whl} where=()
        [[ -d $wheels ]] && where=(--no-index --find-links "$wheels")
        for m in xxhash:xxhash psutil:psutil safetensors:safetensors numpy:numpy tqdm:tqdm pytest:pytest; do
            "$PY" -c "import ${m%%:*}" 2>/dev/null || missing+=("${m#*:}")
        done
        if (( ${#missing[@]} )); then
            say "missing: ${missing[*]}; pip install --no-deps ${where[*]} ${missing[*]}"
            "$PY" -m pip install -q --no-deps --retries 0 --timeout 10 "${where[@]}" "${missing[@]}" || return 1
        fi
        installed=$(cd / && env -u PYTHONPATH "$PY" -c \
            "import dcp_resume, os; print(os.path.dirname(os.path.dirname(dcp_resume.__file__)))" 2>/dev/null)
        if [[ $installed != "$REPO" ]]; then
            say "dcp_resume not installed from $REPO (${installed:-not importable}): pip install -e . --no-deps"
            "$PY" -m pip install -q -e . --no-deps --no-build-isolation --retries 0 --timeout 10 \
                || say "pip install -e failed: the steps below import dcp_resume through PYTHONPATH=$REPO"
        else
            say "dcp_resume already installed from $REPO"
        fi
        "$PY" -c "import dcp_resume; print('dcp_resume', dcp_resume.__version__, 'from', dcp_resume.__file__)"
    }
    run_step "install" 120 env PY="$PY" REPO="$REPO" bash -c "$(declare -f say install_deps); install_deps"

    # 3. the CUDA tests
    local timeout_flag=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 90)
    run_step "pytest -m cuda" 150 "$PY" -m pytest -m cuda tests/unit/test_cuda_paths.py tests/unit/test_incremental.py \
        -q -p no:cacheprovider -rsxX "${timeout_flag[@]}"

    # 3b. what pinned staging holds in host memory
    run_step "pinned staging probe" 60 "$PY" -c "$PINNED" "$OUT_DIR/pinned_probe.txt"

    # 4. save_latency at each size, in its own process and scratch directory
    local base launch=(torchrun) jsons=() mb want repeats need avail n
    base=${GPU_CHECK_SAVE_DIR:-${TMPDIR:-/tmp}}
    if [[ -z ${GPU_CHECK_SAVE_DIR:-} && $(stat -f -c %T "$base" 2>/dev/null) =~ ^(tmpfs|ramfs)$ ]]; then
        base=$REPO/runs  # a RAM-backed /tmp would measure memory, not a disk, and compete for host memory
    fi
    mkdir -p "$base" && SCRATCH=$(mktemp -d "$base/gpu_check_ckpt.XXXXXX") || SCRATCH=""
    [[ -n $SCRATCH ]] && say "checkpoints go to $SCRATCH ($(stat -f -c %T "$SCRATCH") filesystem," \
        "$(( $(df -Pk "$SCRATCH" | awk 'NR==2 {print $4}') / 1024 )) MB free), removed after each size"
    n=$(wc -w <<<"$methods")
    for mb in $sizes; do
        if [[ -z $SCRATCH ]]; then
            STEPS+=("save_latency ${mb} MB|FAILED (no scratch directory under $base)"); continue
        fi
        # each method keeps up to 2 checkpoints of ~3.1x mb (AdamW), plus the floor file: need MB, with 10% margin
        while :; do
            need=$(( (2 * n + 1) * 31 * mb / 10 * 11 / 10 ))
            avail=$(( $(df -Pk "$SCRATCH" | awk 'NR==2 {print $4}') / 1024 ))
            (( need <= avail || mb <= 16 )) && break
            say "save_latency at $mb MB needs ~$need MB of disk, $avail MB free in $SCRATCH: halving the size"
            mb=$(( mb / 2 ))
        done
        if [[ $device == cpu ]]; then
            repeats=1 want=240
        elif (( mb <= 512 )); then
            repeats=3 want=180
        else
            repeats=2 want=300
        fi
        local args=(benchmarks/save_latency.py --device "$device" --sizes "$mb" --repeats "$repeats"
                    --methods $methods --out "$OUT_DIR/save_latency_$mb" --save-dir "$SCRATCH/sl_$mb")
        if [[ ${launch[0]} == torchrun ]]; then
            run_step "save_latency ${mb} MB (torchrun, 1 process)" "$want" \
                "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "${args[@]}"
            rc=$?
            if (( rc != 0 && rc != 124 && rc != 137 )); then
                say "torchrun run failed: the next sizes run as one plain process (no process group)"
                launch=(plain)
            fi
        else
            run_step "save_latency ${mb} MB (one process)" "$want" "$PY" "${args[@]}"
        fi
        rm -rf "$SCRATCH/sl_$mb" "$OUT_DIR/save_latency_$mb/save_latency.png"  # the plot: one point, and a file
        jsons+=("$OUT_DIR/save_latency_$mb/save_latency.json")
    done
    [[ -n $SCRATCH ]] && rm -rf "$SCRATCH"

    # 5. the table and the steps
    say "--- results ---"
    timeout 60 "$PY" benchmarks/_gpu_check_table.py --md "$OUT_DIR/summary.md" "${jsons[@]}" \
        || say "the table could not be printed"
    local failed=0 s
    {
        if [[ -f $OUT_DIR/pinned_probe.txt ]]; then
            echo
            cat "$OUT_DIR/pinned_probe.txt"
            rm -f "$OUT_DIR/pinned_probe.txt"
        fi
        echo
        echo "Steps ($([[ $device == cpu ]] && echo 'CPU TEST RUN of the script, not a GPU check' || echo "$device")," \
             "${SECONDS}s of ${BUDGET}s):"
        for s in "${STEPS[@]}"; do
            echo "- ${s%%|*}: ${s#*|}"
        done
    } | tee -a "$OUT_DIR/summary.md"
    for s in "${STEPS[@]}"; do [[ ${s#*|} == ok* ]] || failed=1; done
    say "done in ${SECONDS}s: $( (( failed )) && echo 'some steps FAILED (above)' || echo 'every step ok')"
    return $failed
}

main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
