"""What a checkpoint costs with incremental saves, on LatentWire with frozen LMs ~28x the trainable parameters
(latentwire.recipe.BENCHMARK_LMS: transformers' Llama and Qwen2 architectures), three schemes side by side in one
run:

- `independent` (the engine's incremental saves): unchanged bytes are linked from the checkpoint before the
  newest, never from a file the newest holds, so the newest two checkpoints share no file (link_source.py);
- `newest` (the scheme before it, reproduced here by choosing the newest complete checkpoint as the base): every
  checkpoint links the one copy of the unchanged bytes;
- `off` (incremental=False): every save writes everything.

For each: bytes written per save in the steady state (and their ratio to the trainable state: parameters plus
AdamW moments), bytes written by all saves, disk used by the kept checkpoints at the end (each inode once, as
`du` counts hard links), save time (sync: the whole save; async: what the caller blocks for, and the whole save)
and peak host memory in the staging buffers (async).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/incremental_save.py [--saves 6] [--rounds 3]

Each round runs the six modes (scheme x sync/async) in an order that rotates with the round, each into a fresh
save_dir keeping 3 checkpoints, one training step between saves. The first saves of a save_dir write everything
(one with `newest`, two with `independent`); the per-save figures are medians over saves 3..N. Prints a markdown
table (rank 0); --out FILE also writes the figures as JSON.
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
from contextlib import nullcontext
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dcp_resume import CheckpointManager, exact_ddp, layout, link_source  # noqa: E402
from dcp_resume.incremental import FINGERPRINTS, Source  # noqa: E402
from latentwire.data import collate, load_examples  # noqa: E402
from latentwire.model import LatentWire, ModelConfig  # noqa: E402
from latentwire.recipe import BENCHMARK_LMS, TINY  # noqa: E402

SCHEMES = ("independent", "newest", "off")
MODES = [(scheme, asynchronous) for scheme in SCHEMES for asynchronous in (False, True)]
KEEP = 3  # the engine's default keep_last_n


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


def disk_bytes(save_dir: str) -> int:
    """Bytes the checkpoints in save_dir take on disk: each file's size, a hard-linked file once."""
    seen = {}
    for dirpath, _, names in os.walk(save_dir):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def newest_as_base(store, save_dir: str, target: str, keep_last_n) -> Source | None:
    """The `newest` scheme: link from the newest complete checkpoint, whatever the newest already shares."""
    done = [i for i in layout.list_checkpoints(store, save_dir) if i.complete and i.path != target]
    base = max(done, key=lambda i: i.order, default=None)
    return None if base is None else Source(base.path, base.meta.get(FINGERPRINTS) or {})


def run_mode(root: str, scheme: str, asynchronous: bool, saves: int, batch) -> dict:
    model, opt, _ = build()
    save_dir = os.path.join(root, f"{scheme}_async{int(asynchronous)}")
    mgr = CheckpointManager(save_dir, keep_last_n=KEEP, verbose=False, enable_preemption_handling=False,
                            async_save=asynchronous, incremental=scheme != "off")
    rows = []
    policy = mock.patch.object(link_source, "choose", newest_as_base) if scheme == "newest" else nullcontext()
    with policy:
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
    disk = disk_bytes(save_dir) if rank() == 0 else None
    if dist.is_initialized():
        dist.barrier()
    if rank() == 0:
        shutil.rmtree(save_dir, ignore_errors=True)
    return {"scheme": scheme, "async": asynchronous, "saves": rows, "disk_bytes": disk}


def all_ranks(value: int) -> list[int]:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=6, help="saves per save_dir (>= 3: the first two may write "
                                                         "everything)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", help="where the save_dirs go (default: a temporary directory)")
    p.add_argument("--out", help="also write the figures here, as JSON")
    a = p.parse_args()
    if a.saves < 3:
        p.error(f"--saves {a.saves}: needs >= 3 (the first two saves may write everything)")
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
            scheme, asynchronous = MODES[(i + r) % len(MODES)]
            results.append(run_mode(root, scheme, asynchronous, a.saves, batch))
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
    for scheme, asynchronous in MODES:
        runs = [r for r in results if (r["scheme"], r["async"]) == (scheme, asynchronous)]
        steady = [s for r in runs for s in r["saves"][2:]]
        written = statistics.median(s["written_bytes"] for s in steady)
        out.append({"scheme": scheme, "async": asynchronous, "written_bytes": written,
                    "written_over_trainable": written / trainable_bytes,
                    "all_saves_written_bytes": statistics.median(sum(s["written_bytes"] for s in r["saves"])
                                                                 for r in runs),
                    "disk_bytes": statistics.median(r["disk_bytes"] for r in runs),
                    "blocking_s": statistics.median(s["blocking_s"] for s in steady),
                    "total_s": statistics.median(s["total_s"] for s in steady),
                    "peak_staging_bytes": max(s["peak_staging_bytes"] for s in steady)})
    return out


def table(report: dict) -> str:
    mb = 1e6
    off = {s["async"]: s for s in report["summary"] if s["scheme"] == "off"}
    lines = [f"model state {report['model_bytes'] / mb:.1f} MB, trainable state (parameters + AdamW moments) "
             f"{report['trainable_state_bytes'] / mb:.2f} MB; {report['machine']['world_size']} ranks, keep_last_n "
             f"{KEEP}, {report['saves']} saves; per save: medians of saves 3..{report['saves']} over "
             f"{report['rounds']} rounds; time ratios against `off` in the same run",
             "| scheme | save | written per save | / trainable state | all saves wrote | disk, kept checkpoints | "
             "blocking | total | total / off | peak staging per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        staging = f"{s['peak_staging_bytes'] / mb:.2f} MB" if s["async"] else "-"
        lines.append(f"| {s['scheme']} | {'async' if s['async'] else 'sync'} | {s['written_bytes'] / mb:.2f} MB | "
                     f"{s['written_over_trainable']:.2f}x | {s['all_saves_written_bytes'] / mb:.1f} MB | "
                     f"{s['disk_bytes'] / mb:.1f} MB | {s['blocking_s']:.3f} s | {s['total_s']:.3f} s | "
                     f"{s['total_s'] / off[s['async']]['total_s']:.2f}x | {staging} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
