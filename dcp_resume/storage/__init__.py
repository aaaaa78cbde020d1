"""Where a save_dir lives: `open_storage(path, storage_options)` makes its Storage once, and every byte the
engine reads or writes outside DCP (and DCP's own writer and reader) goes through that object.

A plain path is the local backend (os calls, fsync, atomic rename): the default fast path. A path with a
scheme (`s3://bucket/run`, `gs://`, `memory://`, `file://`) goes through fsspec. This module is the only
place that tells the two apart. Options for a URL (endpoint, credentials, ...) given once are remembered
for every path under it, so a reader handed only a URL later (find_latest_checkpoint, a checkpoint path)
reaches the same store; anything not given comes from the library's standard environment (AWS_*, ~/.aws).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
from typing import Any

from .base import JSON_LIMIT, Storage
from .local import LocalStorage
from .remote import FsspecStorage

__all__ = ["JSON_LIMIT", "Storage", "LocalStorage", "FsspecStorage", "open_storage", "options_from_json"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LOCAL = LocalStorage()
_remembered: dict[str, dict[str, Any]] = {}  # URL prefix -> the fsspec options last given for it
_mutex = threading.Lock()


def open_storage(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Storage:
    """The Storage for `path`: local for a plain path, fsspec for a URL (with `storage_options`, or those last
    given for a prefix of it). ValueError for options given with a local path; StorageError for a URL whose
    scheme fsspec cannot open. Nothing is read or written here (reachability: Storage.check_reachable)."""
    path = os.fspath(path)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValueError(f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}")
    if not _URL.match(path):
        if storage_options:
            raise ValueError(f"storage_options were given but save_dir={path!r} is a local path; they apply to "
                             "URLs (s3://bucket/run, gs://...) only")
        return _LOCAL
    with _mutex:
        if storage_options is not None:
            _remembered[path.rstrip("/")] = dict(storage_options)
        prefixes = [p for p in _remembered if path == p or path.startswith(p + "/")]
        options = dict(_remembered[max(prefixes, key=len)]) if prefixes else {}
    return FsspecStorage(path, options)


def options_from_json(text: str) -> dict:
    """fsspec storage options given as JSON on a command line: an argparse `type=` (--storage_options,
    --storage-options), raising ArgumentTypeError, whose text argparse prints as is."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value
