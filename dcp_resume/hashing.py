"""Content hashes metadata.json records per file, by the name of its key.

New saves record RECORDED. Verification looks a file's hash up by whichever key its entry carries, so a
checkpoint keeps verifying after RECORDED changes, as long as its algorithm stays in ALGORITHMS. An entry
with no key known here is checked by size only, and said so (`unknown_keys`), never silently.
"""
from __future__ import annotations

from typing import Any, Callable

import xxhash

from .storage import Storage

RECORDED = "xxh3_64"  # xxhash's XXH3, 64 bit, hex digest: faster than disks read, so hashing is not the bottleneck
ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3_64": xxhash.xxh3_64}
NOT_HASHES = {"size"}  # the other keys a file's entry holds
_CHUNK = 4 << 20


def file_digest(store: Storage, path: str, algorithm: str | None = None) -> tuple[int, str]:
    """(size, hex digest) of a file (by `algorithm`, default RECORDED), from one sequential read (the page cache
    right after a write)."""
    h = ALGORITHMS[RECORDED if algorithm is None else algorithm]()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with store.open_read(path) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def file_info(store: Storage, path: str) -> dict[str, Any]:
    """What metadata.json records for one file: its size and its content hash."""
    size, digest = file_digest(store, path, RECORDED)
    return {"size": size, RECORDED: digest}


def recorded(entry: Any) -> tuple[str, Any] | None:
    """(algorithm, recorded digest) of the first algorithm known here that the entry carries, or None."""
    if not isinstance(entry, dict):
        return None
    return next(((name, entry[name]) for name in ALGORITHMS if name in entry), None)


def unknown_keys(entry: Any) -> list[str]:
    """Keys of an entry that are neither its size nor a hash known here (a newer dcp-resume's algorithm)."""
    return sorted(k for k in entry if k not in NOT_HASHES and k not in ALGORITHMS) if isinstance(entry, dict) else []
