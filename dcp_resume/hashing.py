"""Content hashes metadata.json records per file, by the name of its key.

New saves record RECORDED for every file and, for a DCP shard, `<RECORDED>_items`: the hash of each item's
byte range ([offset, length, digest] per item DCP wrote into it), computed in the same read as the file's
hash. The item hashes let a load verify each item as it reads it (verified_read.py), so resuming reads every
byte once. Verification looks a file's hash up by whichever key its entry carries, so a checkpoint keeps
verifying after RECORDED changes, as long as its algorithm stays in ALGORITHMS. An entry with no key known
here is checked by size only, and said so (`unknown_keys`), never silently.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import xxhash

from .storage import Storage
from .untrusted import is_count

HASH_THREADS = max(2, min(8, os.cpu_count() or 1))  # files one process hashes at once
RECORDED = "xxh3_64"  # xxhash's XXH3, 64 bit, hex digest: faster than disks read, so hashing is not the bottleneck
ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3_64": xxhash.xxh3_64}
ITEMS = "_items"  # suffix of the key holding a shard's per-item hashes: "xxh3_64_items"
NOT_HASHES = {"size"}  # the other keys a file's entry holds
_CHUNK = 4 << 20


def digest(data, algorithm: str = RECORDED) -> str:
    """Hex digest of bytes already in memory (xxhash releases the GIL: threads hash in parallel)."""
    return ALGORITHMS[algorithm](data).hexdigest()


def in_parallel(fn: Callable[[Any], Any], jobs: list) -> list:
    """[fn(job) for job in jobs], HASH_THREADS at a time (reading and hashing release the GIL, so a single
    process is not bound to one core); a job's exception is returned in place of its result."""
    def guarded(job):
        try:
            return fn(job)
        except Exception as e:  # the caller reports it for its file
            return e
    if len(jobs) < 2:
        return [guarded(job) for job in jobs]
    with ThreadPoolExecutor(min(HASH_THREADS, len(jobs)), thread_name_prefix="dcp-resume-hash") as pool:
        return list(pool.map(guarded, jobs))


def file_digest(store: Storage, path: str, algorithm: str | None = None) -> tuple[int, str]:
    """(size, hex digest) of a file (by `algorithm`, default RECORDED), from one sequential read."""
    size, whole, _ = file_digests(store, path, algorithm)
    return size, whole


def file_digests(store: Storage, path: str, algorithm: str | None = None,
                 items: Iterable[tuple[int, int]] = ()) -> tuple[int, str, list[list]]:
    """(size, hex digest, [[offset, length, digest] per item]) of a file from one sequential read (the page
    cache right after a write). `items`: byte ranges whose hashes are wanted too."""
    name = RECORDED if algorithm is None else algorithm
    whole = ALGORITHMS[name]()
    ranges = sorted(set((int(o), int(n)) for o, n in items))
    open_items: list[tuple[int, int, Any]] = []  # (offset, length, hasher) of ranges the read is inside
    done: list[list] = []
    pending = 0  # index of the next range not yet started
    size = 0
    with store.open_read(path) as f:
        buf = bytearray(_buffer_size(f))
        view = memoryview(buf)
        while n := f.readinto(buf):
            chunk = view[:n]
            whole.update(chunk)
            end = size + n
            while pending < len(ranges) and ranges[pending][0] < end:
                open_items.append((*ranges[pending], ALGORITHMS[name]()))
                pending += 1
            still = []
            for offset, length, h in open_items:
                lo, hi = max(offset, size), min(offset + length, end)
                if hi > lo:
                    h.update(chunk[lo - size:hi - size])
                if offset + length <= end:
                    done.append([offset, length, h.hexdigest()])
                else:
                    still.append((offset, length, h))
            open_items = still
            size = end
    done += [[o, n, h.hexdigest()] for o, n, h in open_items]  # ranges past the end: a digest that never matches
    done += [[o, n, ""] for o, n in ranges[pending:]]
    return size, whole.hexdigest(), sorted(done)


def _buffer_size(f) -> int:
    """_CHUNK, or less for a smaller file: a fresh 4 MB buffer (zero fill, page faults) cost ~2 ms to hash a
    60 kB DCP index, more than the hashing."""
    try:
        known = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # not a local file: fsspec's files say their size
        known = getattr(f, "size", None)
    return min(_CHUNK, known + 1) if isinstance(known, int) and known >= 0 else _CHUNK


def file_info(store: Storage, path: str, items: Iterable[tuple[int, int]] = ()) -> dict[str, Any]:
    """What metadata.json records for one file: its size, its content hash and, for `items` (the byte ranges
    of the DCP items in a shard), each range's hash."""
    items = list(items)
    size, whole, per_item = file_digests(store, path, RECORDED, items)
    entry: dict[str, Any] = {"size": size, RECORDED: whole}
    if items:
        entry[RECORDED + ITEMS] = per_item
    return entry


def recorded(entry: Any) -> tuple[str, Any] | None:
    """(algorithm, recorded digest) of the first algorithm known here that the entry carries, or None."""
    if not isinstance(entry, dict):
        return None
    return next(((name, entry[name]) for name in ALGORITHMS if name in entry), None)


def recorded_items(entry: Any) -> tuple[str, dict[tuple[int, int], str]] | None:
    """(algorithm, {(offset, length): digest}) of a shard's per-item hashes, or None when the entry has none
    known here or they are malformed (then the whole file is hashed instead)."""
    if not isinstance(entry, dict):
        return None
    for name in ALGORITHMS:
        rows = entry.get(name + ITEMS)
        if rows is None:
            continue
        if not isinstance(rows, list):
            return None
        out = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and all(map(is_count, row[:2]))
                    and isinstance(row[2], str)):
                return None
            out[(row[0], row[1])] = row[2]
        return name, out
    return None




def unknown_keys(entry: Any) -> list[str]:
    """Keys of an entry that are neither its size nor a hash known here (a newer dcp-resume's algorithm)."""
    if not isinstance(entry, dict):
        return []
    known = NOT_HASHES | set(ALGORITHMS) | {name + ITEMS for name in ALGORITHMS}
    return sorted(k for k in entry if k not in known)
