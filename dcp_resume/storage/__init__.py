"""Every byte the engine writes or reads outside DCP goes through here, for a plain path or a URL.

A plain path uses the local backend (os calls, fsync, atomic rename): the default fast path. A path with
a scheme (`s3://bucket/run`, `gs://`, `memory://`, `file://`) goes through fsspec. Options for a URL
(endpoint, credentials, ...) are registered once per save_dir with `configure`; anything not given there
comes from the library's standard environment (AWS_* variables, ~/.aws, ...). This module is also the one
place that computes the content hashes metadata.json records.
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import xxhash

from .local import LocalBackend
from .remote import FsspecBackend

HASH_KEY = "xxh3_64"  # the content hash metadata.json records per file (xxhash's XXH3, 64 bit, hex)
_CHUNK = 4 << 20
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LOCAL = LocalBackend()
_options: dict[str, dict[str, Any]] = {}  # URL prefix -> fsspec storage options
_mutex = threading.Lock()


def is_url(path: str) -> bool:
    return bool(_URL.match(os.fspath(path)))


def configure(url: str, storage_options: dict[str, Any] | None) -> None:
    """Use these fsspec options for every path under `url` (the longest registered prefix wins)."""
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValueError(f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}")
    with _mutex:
        _options[url.rstrip("/")] = dict(storage_options or {})


def _options_for(url: str) -> dict[str, Any]:
    with _mutex:
        matches = [p for p in _options if url == p or url.startswith(p + "/")]
    return dict(_options[max(matches, key=len)]) if matches else {}


def fsspec_options(url: str) -> dict[str, Any]:
    """What every fsspec filesystem for `url` is opened with (here and in DCP's FsspecWriter/Reader): the
    registered options, and no listings cache (another rank or job changes the store under us; a stale
    listing would hide a commit or show a deleted checkpoint)."""
    return {"use_listings_cache": False, **_options_for(url)}


def backend(path: str) -> LocalBackend | FsspecBackend:
    path = os.fspath(path)
    return FsspecBackend(path, fsspec_options(path)) if is_url(path) else _LOCAL


def basename(path: str) -> str:
    return os.path.basename(os.fspath(path).rstrip("/"))


# -- thin dispatch -------------------------------------------------------------------------------
def exists(path: str) -> bool:
    return backend(path).exists(path)


def isdir(path: str) -> bool:
    return backend(path).isdir(path)


def is_link(path: str) -> bool:
    return backend(path).is_link(path)


def isfile(path: str) -> bool:
    return backend(path).isfile(path)


def listdir(path: str, dirs_only: bool = False) -> list[str]:
    return backend(path).listdir(path, dirs_only)


def file_sizes(root: str) -> dict[str, int] | None:
    return backend(root).file_sizes(root)


def list_files(root: str) -> list[str]:
    """Relative paths of every file under root, sorted."""
    return sorted(file_sizes(root) or {})


def makedirs(path: str) -> None:
    backend(path).makedirs(path)


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """A regular file's bytes (never a FIFO, device or symlink locally); OSError past `limit` bytes."""
    return backend(path).read_bytes(path, limit=limit)


def options_from_json(text: str) -> dict:
    """fsspec storage options given as JSON on a command line (--storage_options); ValueError if not an object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {type(value).__name__}")
    return value


JSON_LIMIT = 64 << 20  # metadata.json, config.json, training_stats.json: small files; a bigger one is damage


def read_json(path: str) -> Any:
    """A small JSON file, at most JSON_LIMIT bytes. Damage (too big, not JSON, nested past Python's recursion
    limit) raises ValueError or OSError, never RecursionError or MemoryError."""
    data = backend(path).read_bytes(path, limit=JSON_LIMIT)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path} nests deeper than any real metadata; it is damaged") from None


def write_bytes_durably(path: str, data: bytes) -> None:
    backend(path).write_durably(path, data)


def write_json_durably(path: str, obj: Any) -> None:
    write_bytes_durably(path, _json_bytes(obj))


def commit_json_atomically(path: str, obj: Any) -> None:
    """Readers see the old file or the new one, never a part (rename locally, a single PUT remotely)."""
    backend(path).commit_atomically(path, _json_bytes(obj))


def create_exclusive(path: str, data: bytes) -> bool:
    return backend(path).create_exclusive(path, data)


def fsync_dir(path: str) -> None:
    backend(path).sync_dir(path)


def remove_tree(path: str) -> None:
    backend(path).remove_tree(path)


def remove_file(path: str) -> None:
    backend(path).remove_file(path)


def mtime(path: str) -> float:
    return backend(path).mtime(path)


def free_bytes(path: str) -> int | None:
    """Free space where path lives; None where that is unknown (object stores)."""
    return backend(path).free_bytes(path)


def signature(root: str, rels: list[str]) -> tuple | None:
    """Something that changes whenever one of the files is rewritten; None if one is missing."""
    b = backend(root)
    sig = b.signature(root, rels)
    return None if sig is None else (b.identity(root), sig)


def check_reachable(path: str) -> None:
    backend(path).check_reachable(path)


# -- content hashes ------------------------------------------------------------------------------
def file_hash(path: str) -> tuple[int, str]:
    """(size, xxh3_64 hex digest) of a file, from one sequential read (the page cache right after a write)."""
    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with backend(path).open_read(path) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def file_info(path: str) -> dict[str, Any]:
    """What metadata.json records for one file: its size and its content hash."""
    size, digest = file_hash(path)
    return {"size": size, HASH_KEY: digest}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
