"""Physical floors for save_latency.py, and the small distributed helpers it shares.

Each floor is the best (highest throughput) of 3 trials, with every rank working at once between barriers, as
the checkpoint methods do; every trial's figure is kept too (`trials`), to show how noisy the machine was.

- memcpy_gbps: per rank, a copy into a preallocated buffer (what staging into reused buffers can reach).
- write_gbps: all ranks together, each writing its own new file from one preallocated buffer, then fsync.
- read_gbps: all ranks together, that file read straight back into a preallocated buffer with readinto.
  The pages are still cached, so this is the page-cache read rate: what a load right after a save gets.
- cold_read_gbps: the same read after fsync + posix_fadvise(DONTNEED) evicted the file's pages; None where
  they cannot be evicted (no posix_fadvise, or mincore shows them still resident, e.g. on tmpfs).
- d2h_gbps (CUDA only): per rank, a non-blocking device-to-host copy into pinned memory.

On a URL directory (s3://, gs://, memory://) write_gbps and read_gbps are object-store floors instead, through
the same fsspec filesystem the checkpoints use: each rank PUTs its buffer as one object (fs.pipe_file), all
ranks at once, then GETs it back whole (fs.cat_file). cold_read_gbps is None there: the client has no page
cache to evict (every read is a GET), so there is no warm/cold distinction to measure.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import time

import torch
import torch.distributed as dist

from dcp_resume.storage import open_storage

TRIALS = 3


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(msg: str) -> None:
    if rank() == 0:
        print(msg, flush=True)


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def timed(fn) -> tuple[float, float]:
    """(this rank's seconds, seconds from the barrier before until every rank is done) for fn() run on all ranks."""
    barrier()
    t0 = time.perf_counter()
    fn()
    mine = time.perf_counter() - t0
    barrier()
    return mine, time.perf_counter() - t0


def write_file(path: str, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_into(path: str, buf: memoryview) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf[n:]):
            n += k
    return n


def evict(path: str) -> bool:
    """Drop the file's pages from the page cache; False where that is not possible here."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    finally:
        os.close(fd)
    resident = resident_fraction(path)
    return resident is None or resident < 0.05


def resident_fraction(path: str) -> float | None:
    """Share of the file's pages in the page cache (mincore(2)), or None where that cannot be asked."""
    size = os.path.getsize(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, c_mincore, c_munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    if size == 0:
        return 0.0
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = c_mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            if c_mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return None
        finally:
            c_munmap(addr, size)
    finally:
        os.close(fd)
    return 1 - bytes(vec).count(0) / pages


def measure_floors(nbytes: int, directory: str, device: str) -> tuple[dict, dict]:
    """(floors, every trial's figure) for nbytes per rank; the files go to `directory` and are removed."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once
    per_rank, everyone = nbytes / 1e9, nbytes * world() / 1e9
    trials: dict[str, list] = {k: [] for k in ("memcpy_gbps", "write_gbps", "read_gbps", "cold_read_gbps")}
    for _ in range(TRIALS):
        trials["memcpy_gbps"].append(per_rank / timed(lambda: dst.copy_(src))[0])
    data, buf = memoryview(src.numpy()).cast("B"), memoryview(dst.numpy()).cast("B")
    store = open_storage(directory)
    if store.remote:
        fs, blob = store.fs, bytes(data)  # the PUT body, made before any timing
        for t in range(TRIALS):
            key = f"{directory.rstrip('/')}/floor_rank{rank()}_{t}.bin"
            trials["write_gbps"].append(everyone / timed(lambda: fs.pipe_file(key, blob))[1])
            trials["read_gbps"].append(everyone / timed(lambda: fs.cat_file(key))[1])
            fs.rm_file(key)
        del blob
    for t in range(0 if store.remote else TRIALS):
        path = os.path.join(directory, f"floor_rank{rank()}_{t}.bin")
        trials["write_gbps"].append(everyone / timed(lambda: write_file(path, data))[1])
        trials["read_gbps"].append(everyone / timed(lambda: read_into(path, buf))[1])
        if all(all_gather(evict(path))):
            trials["cold_read_gbps"].append(everyone / timed(lambda: read_into(path, buf))[1])
        os.remove(path)
    if device == "cuda":
        gpu = src.cuda()
        pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        pinned.copy_(gpu)
        torch.cuda.synchronize()
        for _ in range(TRIALS):
            trials.setdefault("d2h_gbps", []).append(
                per_rank / timed(lambda: (pinned.copy_(gpu, non_blocking=True), torch.cuda.synchronize()))[0])
    floors = {k: (max(v) if v else None) for k, v in trials.items()}
    return floors, trials
