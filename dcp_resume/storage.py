"""Every byte the engine writes or reads outside DCP goes through here (the local filesystem).

Keeping file I/O in one module is the seam for other backends later; `file_info` is the one place that
computes the content hashes metadata.json records.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import xxhash

HASH_KEY = "xxh3_64"  # the content hash metadata.json records per file (xxhash's XXH3, 64 bit, hex)
_CHUNK = 4 << 20


def file_hash(path: str) -> tuple[int, str]:
    """(size, xxh3_64 hex digest) of a file, from one sequential read (the page cache right after a write).

    Plain reads, not mmap: an I/O error on flaky storage must be an exception, not a SIGBUS."""
    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def file_info(path: str) -> dict[str, Any]:
    """What metadata.json records for one file: its size and its content hash."""
    size, digest = file_hash(path)
    return {"size": size, HASH_KEY: digest}


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: str, data: bytes) -> None:
    """Write a file and fsync it; the caller fsyncs the directory once all files are in."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_durably(path: str, obj: Any) -> None:
    write_bytes_durably(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def commit_json_atomically(path: str, obj: Any) -> None:
    """Temp file + fsync + rename + fsync of the directory: readers see the old file or the new one."""
    tmp = path + ".tmp"
    write_json_durably(tmp, obj)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def list_files(root: str) -> list[str]:
    """Relative paths of every regular file under root, sorted."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        fsync_dir(parent)


def free_bytes(path: str) -> int:
    """Free space on the filesystem holding path (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free
