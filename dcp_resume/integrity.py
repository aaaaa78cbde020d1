"""Content-hash verification of committed checkpoints, cached per process.

A checkpoint's bytes are trusted on load only after every file metadata.json lists has been read in full and
matched its recorded content hash (hashing.py; sizes are already checked by layout.inspect_dir). Hashing
before the load, not while DCP reads, is the only order that keeps a flipped bit out of live objects: DCP
restores in place and reads only the byte ranges a load needs. The read leaves the files in the page cache for
DCP's own read (its cost: benchmarks/README.md, "hash_cost.py").

Results are cached by the checkpoint's real path (or URL) plus the signature of metadata.json and of every
listed file (size, mtime, inode; on an object store size, ETag and modification time): find_latest_checkpoint
then load_checkpoint hashes once, and a file rewritten in between is hashed again. Files listed without a
hash known here (written before hashes existed, or by a newer version's algorithm) are checked by size
only, with a note. Then state/ is checked against DCP's own
index, as `dcp-resume verify` does (verification.dcp_problem): a checkpoint verify calls BAD is never picked
for a resume.
"""
from __future__ import annotations

import os
from typing import Any

from . import dcp_io, hashing, verification
from .errors import CorruptCheckpointError
from .layout import METADATA_FILE, NO_COMMIT, STATE_DIR, CheckpointInfo, list_checkpoints
from .logs import logger
from .storage import Storage

_verified: dict[tuple, tuple[str, str] | None] = {}  # (realpath, stat signature) -> None or (kind, problem)


def _signature(store: Storage, path: str, files: dict[str, Any]) -> tuple | None:
    try:
        return store.signature(path, [METADATA_FILE, *sorted(files)])
    except OSError:
        return None


def _hash_problem(store: Storage, path: str, files: dict[str, Any]) -> str | None:
    """The first listed file whose bytes do not match metadata.json, as '<file> <what is wrong>'."""
    unhashed, unknown = [], set()
    for rel, info in sorted(files.items()):
        found = hashing.recorded(info)
        if found is None:
            unhashed.append(rel)
            unknown.update(hashing.unknown_keys(info))
            continue
        algorithm, want = found
        size, got = hashing.file_digest(store, os.path.join(path, rel), algorithm)
        if size != info.get("size"):
            return f"{rel} size changed while it was verified ({size} bytes, metadata.json says {info.get('size')})"
        if got != want:
            return f"{rel} content hash mismatch ({algorithm} of the file is {got}, metadata.json records {want})"
    if unknown:
        logger.warning("%s: %d file(s) carry only hashes this dcp-resume does not know (%s), checked by size "
                       "only: upgrade dcp-resume to check their contents", path, len(unhashed),
                       ", ".join(sorted(unknown)))
    elif unhashed:
        logger.debug("%s: %d file(s) carry no content hash (written before dcp-resume recorded them), checked by "
                     "size only: %s", path, len(unhashed), ", ".join(unhashed))
    return None


def _problem(store: Storage, info: CheckpointInfo) -> tuple[str, str] | None:
    """(kind, text) of the first problem: kind 'hash' (bytes changed since the commit) or 'dcp' (state/ does
    not match DCP's index, or the index is unsafe); None when the checkpoint verifies. Cached."""
    files = info.meta.get("files") or {}
    key = _signature(store, info.path, files)
    if key is not None and key in _verified:
        return _verified[key]
    try:
        found = None
        if (text := _hash_problem(store, info.path, files)) is not None:
            found = ("hash", text)
        elif (text := verification.dcp_problem(store, info)) is not None:
            found = ("dcp", text)
    except OSError as e:  # unreadable now (EIO, permissions, removed meanwhile): not cached, may be transient
        where = os.path.relpath(e.filename, info.path) if isinstance(e.filename, str) else "a listed file"
        return "hash", f"{where} unreadable ({e.strerror or e})"
    if key is not None:
        _verified[key] = found
    return found


def problem(store: Storage, info: CheckpointInfo) -> str | None:
    """None when the complete checkpoint `info` verifies (hashes, then state/ against DCP's index, as
    `dcp-resume verify` checks), else the first problem, naming the file."""
    if not info.complete:
        return info.reason
    found = _problem(store, info)
    return None if found is None else found[1]


def check(store: Storage, info: CheckpointInfo) -> None:
    """Raise CorruptCheckpointError (or UnsafeCheckpointError) naming the checkpoint and the file unless
    `info` verifies."""
    if not info.complete:
        raise CorruptCheckpointError(f"{info.path} fails verification: {info.reason}")
    found = _problem(store, info)
    if found is None:
        return
    kind, text = found
    if kind == "dcp":
        dcp_io.read_metadata(store, os.path.join(info.path, STATE_DIR))  # an unsafe or unreadable index: its own error
        raise CorruptCheckpointError(f"{info.path} fails verification: {text}; it is not loaded: resume from "
                                     "another checkpoint (`dcp-resume ls <save_dir>` lists them)")
    raise CorruptCheckpointError(
        f"{info.path} fails verification: {text}. Its files changed after the checkpoint was committed "
        "(disk corruption, a partial copy or an edit), so it is not loaded; resume from another checkpoint "
        "(`dcp-resume ls <save_dir>` lists them)")


def latest_verified(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None
                    ) -> CheckpointInfo | None:
    """What resume uses: the newest complete checkpoint whose files all match their content hashes.

    Every damaged checkpoint passed over gets a warning naming it and the file: a complete one that fails
    its hashes, and one whose metadata.json is there but does not parse or lists missing or resized files.
    (A directory without metadata.json is an interrupted save, not damage: skipped quietly.) `infos`: save_dir's
    list_checkpoints() when the caller already has it."""
    infos = list_checkpoints(store, save_dir) if infos is None else infos
    for info in infos:
        if not info.complete and info.reason != NO_COMMIT:
            logger.warning("Skipping checkpoint %s: %s", info.path, info.reason)
    for info in sorted((i for i in infos if i.complete), key=lambda i: i.order, reverse=True):
        found = problem(store, info)
        if found is None:
            return info
        logger.warning("Skipping checkpoint %s: %s", info.path, found)
    return None
