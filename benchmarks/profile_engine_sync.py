"""Where a synchronous engine save spends its time, next to plain dcp.save of the same state (cProfile).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/profile_engine_sync.py --mb 96 --saves 4

Per rank: the median wall time of dcp_sync and engine_sync saves (interleaved), and for the engine the
cumulative time of its phases over the warm saves: DCP's write (dcp_io.save), hashing its own files
(hashing.file_digest), rank 0's preparation (_prepare_target: lock, leftovers, free space), commit
(_commit: side files, metadata.json, fsyncs) and retention (_apply_retention: deleting the oldest).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from save_latency import build_state  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402

PHASES = {"dcp_io.py:save": "DCP write (dcp_io.save)", "hashing.py:file_digest": "hash own files (file_digest)",
          "manager.py:_prepare_target": "prepare (rank 0)", "commit.py:_commit": "commit (rank 0)",
          "manager.py:_apply_retention": "retention (rank 0)"}


def phase_times(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for (filename, _, func), (_, _, _, cumtime, _) in stats.stats.items():
        key = f"{os.path.basename(filename)}:{func}"
        if key in PHASES and "dcp_resume" in filename:
            out[PHASES[key]] = out.get(PHASES[key], 0.0) + cumtime
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=96, help="MB of parameters per rank (Adam state on top)")
    p.add_argument("--saves", type=int, default=4, help="warm saves per method (after one cold save)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    a = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    root = a.dir or (tempfile.mkdtemp(prefix="profile_engine_sync_") if rank == 0 else None)
    if dist.is_initialized():
        box = [root]
        dist.broadcast_object_list(box)
        root = box[0]
    model, opt = build_state(a.mb, "cpu")
    mgr = CheckpointManager(os.path.join(root, "engine"), keep_last_n=2, verbose=False,
                            enable_preemption_handling=False)
    prof = cProfile.Profile()
    times = {"dcp_sync": [], "engine_sync": []}
    for i in range(a.saves + 1):
        for method in times:
            barrier()
            t0 = time.perf_counter()
            if method == "dcp_sync":
                path = os.path.join(root, "dcp", f"step_{i}")
                dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)
            else:
                if i > 0:
                    prof.enable()
                mgr.save_checkpoint({"model": model, "optimizer": opt}, step=i + 1)
                prof.disable()
            barrier()
            if i > 0:
                times[method].append(time.perf_counter() - t0)
            if method == "dcp_sync" and rank == 0 and i >= 2:
                shutil.rmtree(os.path.join(root, "dcp", f"step_{i - 2}"), ignore_errors=True)
    mgr.close()
    phases = phase_times(pstats.Stats(prof))
    lines = [f"rank {rank}: median of {a.saves} warm saves: dcp_sync {statistics.median(times['dcp_sync']):.3f} s, "
             f"engine_sync {statistics.median(times['engine_sync']):.3f} s "
             f"({statistics.median(times['engine_sync']) / statistics.median(times['dcp_sync']):.2f}x)"]
    lines += [f"  engine phase {name:<28} {t / a.saves:.3f} s per save" for name, t in phases.items()]
    outputs = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(outputs, "\n".join(lines))
    else:
        outputs = ["\n".join(lines)]
    if rank == 0:
        print("\n".join(outputs))
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
