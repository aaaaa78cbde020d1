"""What a checkpoint costs with incremental saves on and off, on LatentWire with frozen LMs ~28x the trainable
parameters (latentwire.recipe.BENCHMARK_LMS: transformers' Llama and Qwen2 architectures), side by side in one
run: bytes written per checkpoint (and their ratio to the trainable state: parameters plus AdamW moments),
save time (sync: the whole save; async: what the caller blocks for, and the whole save), and peak host memory
in the staging buffers (async).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/incremental_save.py [--saves 4] [--rounds 3]

Each round runs the four modes (incremental on/off x sync/async) in an order that rotates with the round, each
into a fresh save_dir, one training step between saves. The first save of a save_dir writes everything in
every mode; the figures are the medians over the later saves. Prints a markdown table (rank 0); --out FILE
also writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dcp_resume import CheckpointManager, exact_ddp  # noqa: E402
from latentwire.data import collate, load_examples  # noqa: E402
from latentwire.model import LatentWire, ModelConfig  # noqa: E402
from latentwire.recipe import BENCHMARK_LMS, TINY  # noqa: E402

MODES = [(incremental, asynchronous) for incremental in (True, False) for asynchronous in (False, True)]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build():
    torch.manual_seed(0)
    model = LatentWire(ModelConfig(**TINY, **BENCHMARK_LMS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    wrapped = exact_ddp(model) if dist.is_initialized() and dist.get_world_size() > 1 else model
    return wrapped, opt, trainable


def step(model, opt, batch) -> None:
    model(batch)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def written_bytes(ckpt: str) -> int:
    """Bytes this save wrote: every listed file except the ones linked from earlier checkpoints."""
    files = json.load(open(os.path.join(ckpt, "metadata.json")))["files"]
    return sum(info["size"] for rel, info in files.items() if not os.path.basename(rel).startswith("ref."))


def run_mode(root: str, incremental: bool, asynchronous: bool, saves: int, batch) -> dict:
    model, opt, _ = build()
    save_dir = os.path.join(root, f"inc{int(incremental)}_async{int(asynchronous)}")
    mgr = CheckpointManager(save_dir, keep_last_n=2, verbose=False, enable_preemption_handling=False,
                            async_save=asynchronous, incremental=incremental)
    rows = []
    for n in range(1, saves + 1):
        step(model, opt, batch)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        path = mgr.save_checkpoint({"model": model, "optimizer": opt}, step=n)
        blocking = time.perf_counter() - t0
        mgr.wait()
        total = time.perf_counter() - t0
        staged = mgr._staging.nbytes() if asynchronous else 0
        peak = max(all_ranks(staged))
        rows.append({"save": n, "blocking_s": blocking, "total_s": total, "peak_staging_bytes": peak,
                     "written_bytes": written_bytes(path) if rank() == 0 else None})
    mgr.close()
    if rank() == 0:
        shutil.rmtree(save_dir, ignore_errors=True)
    return {"incremental": incremental, "async": asynchronous, "saves": rows}


def all_ranks(value: int) -> list[int]:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=4, help="saves per save_dir (the first writes everything)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", help="where the save_dirs go (default: a temporary directory)")
    p.add_argument("--out", help="also write the figures here, as JSON")
    a = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    root = a.dir or (tempfile.mkdtemp(prefix="incremental_save_") if rank() == 0 else None)
    if dist.is_initialized():
        holder = [root]
        dist.broadcast_object_list(holder)
        root = holder[0]
    batch = collate(load_examples("synthetic", 8), TINY["max_context_bytes"], TINY["max_answer_tokens"])
    _, _, trainable = build()
    trainable_bytes = 3 * sum(p.numel() * p.element_size() for p in trainable)  # parameters + 2 AdamW moments
    model_bytes = sum(t.numel() * t.element_size() for t in build()[0].state_dict().values())
    results = []
    for r in range(a.rounds):
        for i in range(len(MODES)):
            incremental, asynchronous = MODES[(i + r) % len(MODES)]
            results.append(run_mode(root, incremental, asynchronous, a.saves, batch))
    if rank() == 0:
        summary = summarize(results, trainable_bytes)
        machine = {"torch": torch.__version__, "cpus": os.cpu_count(),
                   "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        report = {"machine": machine, "model_bytes": model_bytes, "trainable_state_bytes": trainable_bytes,
                  "saves": a.saves, "rounds": a.rounds, "summary": summary, "results": results}
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=2)
        print(table(report))
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def summarize(results: list[dict], trainable_bytes: int) -> list[dict]:
    out = []
    for incremental, asynchronous in MODES:
        later = [s for r in results if (r["incremental"], r["async"]) == (incremental, asynchronous)
                 for s in r["saves"][1:]]
        written = statistics.median(s["written_bytes"] for s in later)
        out.append({"incremental": incremental, "async": asynchronous, "written_bytes": written,
                    "written_over_trainable": written / trainable_bytes,
                    "blocking_s": statistics.median(s["blocking_s"] for s in later),
                    "total_s": statistics.median(s["total_s"] for s in later),
                    "peak_staging_bytes": max(s["peak_staging_bytes"] for s in later)})
    return out


def table(report: dict) -> str:
    mb = 1e6
    lines = [f"model state {report['model_bytes'] / mb:.1f} MB, trainable state (parameters + AdamW moments) "
             f"{report['trainable_state_bytes'] / mb:.2f} MB; {report['machine']['world_size']} ranks, medians of "
             f"saves 2..{report['saves']} over {report['rounds']} rounds",
             "| incremental | save | written per checkpoint | written / trainable state | blocking | total | "
             "peak staging per rank |", "|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        staging = f"{s['peak_staging_bytes'] / mb:.2f} MB" if s["async"] else "-"
        lines.append(f"| {'on' if s['incremental'] else 'off'} | {'async' if s['async'] else 'sync'} | "
                     f"{s['written_bytes'] / mb:.2f} MB | {s['written_over_trainable']:.2f}x | "
                     f"{s['blocking_s']:.3f} s | {s['total_s']:.3f} s | {staging} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
