"""What content hashing costs: xxh3_64 throughput on a file right after it was written (page cache), and
the share of a real CheckpointManager save spent hashing (each rank hashes its own shards, rank 0 also the
side files; hashing.file_info is the one place that does it, so timing it times all hashing).

    python benchmarks/hash_cost.py [--mb 200] [--repeats 5] [--dir /tmp/hash_cost]

Prints a markdown table (and --json for a machine-readable line). Single process, CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import xxhash  # noqa: E402

from dcp_resume import CheckpointManager, hashing  # noqa: E402
from dcp_resume.storage import open_storage  # noqa: E402


def file_hash_gbps(path: str, mb: int, repeats: int) -> tuple[float, float]:
    """(file hash GB/s from the page cache, in-memory xxh3_64 GB/s), medians."""
    data = os.urandom(mb * 1_000_000)
    store = open_storage(path)
    store.write_durably(path, data)
    file_rates, mem_rates = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        hashing.file_digest(store, path)
        file_rates.append(len(data) / 1e9 / (time.perf_counter() - t))
        t = time.perf_counter()
        xxhash.xxh3_64(data).hexdigest()
        mem_rates.append(len(data) / 1e9 / (time.perf_counter() - t))
    return statistics.median(file_rates), statistics.median(mem_rates)


def save_share(root: str, mb: int, repeats: int) -> tuple[float, float, float]:
    """(median save seconds, median hashing seconds within it, checkpoint MB) for a sync save of ~mb MB."""
    spent: list[float] = []
    real = hashing.file_info

    def timed(store, path):
        t = time.perf_counter()
        try:
            return real(store, path)
        finally:
            spent.append(time.perf_counter() - t)

    hashing.file_info = timed
    state = {"weights": torch.randn(mb * 250_000)}  # fp32: mb MB
    totals, hash_s = [], []
    try:
        for i in range(repeats + 1):
            save_dir = os.path.join(root, f"run{i}")
            spent.clear()
            with CheckpointManager(save_dir, keep_last_n=None, verbose=False) as mgr:
                t = time.perf_counter()
                path = mgr.save_checkpoint(state, step=1)
                total = time.perf_counter() - t
            if i:  # the first save is a warm-up (allocations, imports)
                totals.append(total)
                hash_s.append(sum(spent))
            size = sum(os.path.getsize(os.path.join(path, f)) for f in open_storage(path).list_files(path))
            shutil.rmtree(save_dir)
    finally:
        hashing.file_info = real
    return statistics.median(totals), statistics.median(hash_s), size / 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/tmp/hash_cost")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    try:
        file_gbps, mem_gbps = file_hash_gbps(os.path.join(a.dir, "blob.bin"), a.mb, a.repeats)
        save_s, hash_s, ckpt_mb = save_share(a.dir, a.mb, a.repeats)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    row = {"file_mb": a.mb, "hash_file_gbps": round(file_gbps, 2), "hash_memory_gbps": round(mem_gbps, 2),
           "checkpoint_mb": round(ckpt_mb, 1), "save_s": round(save_s, 3), "hashing_s": round(hash_s, 3),
           "hashing_share": round(hash_s / save_s, 3)}
    if a.json:
        print(json.dumps(row))
    print("| file MB | xxh3_64 from page cache GB/s | xxh3_64 in memory GB/s | checkpoint MB | sync save s "
          "| hashing s | hashing share of save |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.mb} | {file_gbps:.2f} | {mem_gbps:.2f} | {ckpt_mb:.0f} | {save_s:.3f} | {hash_s:.3f} "
          f"| {100 * hash_s / save_s:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
