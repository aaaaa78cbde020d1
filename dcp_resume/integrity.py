"""Content-hash verification of committed checkpoints, cached per process, and the cheap choice of a candidate.

Two levels. `latest_candidate` (what find_latest_checkpoint and a resume's discovery use) reads no content:
the newest complete checkpoint (sizes, layout.inspect_dir) whose state/ matches DCP's own index
(verification.dcp_problem) and that this process has not already found damaged. A resume then verifies the
bytes it uses as it reads them, spread over the ranks and agreed (resume_check.py).

`problem`, `check` and `latest_verified` (the CLI's `latest` and `verify`, a save at the step of an existing
checkpoint, a run's claim of its save_dir) read every file metadata.json lists in full and match its recorded
content hash, several files at once (threads: hashing releases the GIL), then check state/ against DCP's
index. Files listed without a hash known here (written before hashes existed, or by a newer version's
algorithm) are checked by size only, with a note.

Results are cached by the checkpoint's real path (or URL) plus the signature of metadata.json and of every
listed file (size, mtime, inode; on an object store size, ETag and modification time), so a file rewritten
in between is hashed again; a resume that found a checkpoint damaged records it here too.
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
_suspect: set = set()  # store.file_identity of every file of a checkpoint found damaged: never linked from


def _signature(store: Storage, path: str, files: dict[str, Any]) -> tuple | None:
    try:
        return store.signature(path, [METADATA_FILE, *sorted(files)])
    except OSError:
        return None


def _one_file(store: Storage, path: str, rel: str, info: dict) -> tuple[str | None, int]:
    """(what is wrong with one listed file, or None; its bytes, all read)."""
    algorithm, want = hashing.recorded(info)
    size, got = hashing.file_digest(store, os.path.join(path, rel), algorithm)
    if size != info.get("size"):
        return f"{rel} size changed while it was verified ({size} bytes, metadata.json says {info.get('size')})", size
    if got != want:
        return f"{rel} content hash mismatch ({algorithm} of the file is {got}, metadata.json records {want})", size
    return None, size


def hash_problem(store: Storage, path: str, files: dict[str, Any], note: bool = True) -> tuple[str | None, int]:
    """(the first listed file, by name, whose bytes do not match metadata.json, as '<file> <what is wrong>', or
    None; the bytes read). Files are hashed hashing.HASH_THREADS at a time; an unreadable one raises its OSError.
    `note`: say which files carry no hash known here (checked by size only)."""
    todo = [(rel, info) for rel, info in sorted(files.items()) if hashing.recorded(info) is not None]
    results = hashing.in_parallel(lambda job: _one_file(store, path, *job), todo)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    read = sum(n for _, n in results)
    found = next((text for text, _ in results if text is not None), None)
    if found is None and note:
        note_unhashed(path, files)
    return found, read


def note_unhashed(path: str, files: dict[str, Any]) -> None:
    """A warning for files carrying only hashes this version does not know, a debug note for files carrying
    none (written before hashes existed): both are checked by size only."""
    unhashed = [rel for rel, info in sorted(files.items()) if hashing.recorded(info) is None]
    unknown = sorted({key for rel in unhashed for key in hashing.unknown_keys(files[rel])})
    if unknown:
        logger.warning("%s: %d file(s) carry only hashes this dcp-resume does not know (%s), checked by size "
                       "only: upgrade dcp-resume to check their contents", path, len(unhashed), ", ".join(unknown))
    elif unhashed:
        logger.debug("%s: %d file(s) carry no content hash (written before dcp-resume recorded them), checked by "
                     "size only: %s", path, len(unhashed), ", ".join(unhashed))


def _metadata_hash_problem(store: Storage, info: CheckpointInfo) -> str | None:
    rel = f"{STATE_DIR}/{dcp_io.DCP_METADATA}"
    entry = (info.meta.get("files") or {}).get(rel)
    if hashing.recorded(entry) is None:
        return None
    try:
        return _one_file(store, info.path, rel, entry)[0]
    except OSError as e:
        return f"{rel} unreadable ({e.strerror or e})"


def index_problem(store: Storage, info: CheckpointInfo) -> str | None:
    """The cheap check a candidate for resume gets: state/.metadata against its recorded hash (it is small, and
    DCP's index is read anyway), then state/ against that index (verification.dcp_problem)."""
    return _metadata_hash_problem(store, info) or verification.dcp_problem(store, info)


def _problem(store: Storage, info: CheckpointInfo) -> tuple[str, str] | None:
    """(kind, text) of the first problem: kind 'hash' (bytes changed since the commit) or 'dcp' (state/ does
    not match DCP's index, or the index is unsafe); None when the checkpoint verifies. Cached."""
    files = info.meta.get("files") or {}
    key = _signature(store, info.path, files)
    if key is not None and key in _verified:
        return _verified[key]
    try:
        found = None
        if (text := hash_problem(store, info.path, files)[0]) is not None:
            found = ("hash", text)
        elif (text := verification.dcp_problem(store, info)) is not None:
            found = ("dcp", text)
    except OSError as e:  # unreadable now (EIO, permissions, removed meanwhile): not cached, may be transient
        where = os.path.relpath(e.filename, info.path) if isinstance(e.filename, str) else "a listed file"
        return "hash", f"{where} unreadable ({e.strerror or e})"
    if key is not None:
        _verified[key] = found
    if found is not None:
        _suspect_files_of(store, info)
    return found


def remember(store: Storage, info: CheckpointInfo, text: str) -> None:
    """Record that a load found `info` damaged (`text` names the file), so this process passes it over."""
    key = _signature(store, info.path, info.meta.get("files") or {})
    if key is not None:
        _verified[key] = ("hash", text)
    _suspect_files_of(store, info)


def _suspect_files_of(store: Storage, info: CheckpointInfo) -> None:
    """Every file of a damaged checkpoint becomes suspect, whichever held the damage: a later save then writes
    anew what it would have linked from another checkpoint sharing one of them (the same inode)."""
    for rel in info.on_disk:
        try:
            _suspect.add(store.file_identity(os.path.join(info.path, rel)))
        except OSError:
            continue


def suspect(store: Storage, path: str) -> bool:
    """Whether the file at `path` is (the same file as) one of a checkpoint this process found damaged."""
    try:
        return store.file_identity(path) in _suspect
    except OSError:
        return True


def known_problem(store: Storage, info: CheckpointInfo) -> str | None:
    """The cached problem of `info`, without reading its contents (None: not known to be damaged)."""
    key = _signature(store, info.path, info.meta.get("files") or {})
    found = _verified.get(key) if key is not None else None
    return None if found is None else found[1]


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
    raise corrupt(info.path, kind, text)


def check_index(store: Storage, info: CheckpointInfo) -> None:
    """Raise CorruptCheckpointError (or UnsafeCheckpointError) unless state/.metadata matches its recorded hash
    and state/ matches that index: what index_problem checks, as an error."""
    text = _metadata_hash_problem(store, info)
    if text is not None:
        raise corrupt(info.path, "hash", text)
    text = verification.dcp_problem(store, info)
    if text is not None:
        dcp_io.read_metadata(store, os.path.join(info.path, STATE_DIR))  # an unsafe or unreadable index: its own error
        raise corrupt(info.path, "dcp", text)


def corrupt(path: str, kind: str, text: str) -> CorruptCheckpointError:
    """The error a load of a damaged checkpoint raises: kind 'hash' (its bytes changed since the commit) or 'dcp'
    (state/ does not match DCP's index)."""
    if kind == "dcp":
        error = CorruptCheckpointError(f"{path} fails verification: {text}; it is not loaded: resume from another "
                                       "checkpoint (`dcp-resume ls <save_dir>` lists them)")
    else:
        error = CorruptCheckpointError(
            f"{path} fails verification: {text}. Its files changed after the checkpoint was committed (disk "
            "corruption, a partial copy or an edit), so it is not loaded; resume from another checkpoint "
            "(`dcp-resume ls <save_dir>` lists them)")
    error.detail = text  # what a fallback's "Skipping checkpoint" warning says
    return error


def warn_damaged(infos: list[CheckpointInfo]) -> None:
    """A warning for each directory whose metadata.json is there but broken (not for interrupted saves)."""
    for info in infos:
        if not info.complete and info.reason != NO_COMMIT:
            logger.warning("Skipping checkpoint %s: %s", info.path, info.reason)


def latest_candidate(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None,
                     below: tuple | None = None) -> CheckpointInfo | None:
    """What a resume tries first (and, with `below`, the order of the checkpoint that failed, next): the
    newest complete checkpoint whose state/ matches DCP's index and that this process has not found damaged.
    No content is read but metadata.json and DCP's index; damaged ones passed over get a warning."""
    if infos is None:
        infos = list_checkpoints(store, save_dir)
        if below is None:
            warn_damaged(infos)
    for info in sorted((i for i in infos if i.complete), key=lambda i: i.order, reverse=True):
        if below is not None and info.order >= below:
            continue
        found = known_problem(store, info) or index_problem(store, info)
        if found is None:
            return info
        logger.warning("Skipping checkpoint %s: %s", info.path, found)
    return None


def all_damaged(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None) -> str | None:
    """When save_dir holds committed checkpoints and none of them verifies: each, newest first, with its first
    problem ('step_4 (listed file missing: state/__1_0.distcp); step_2 (...)'; cached: the resume that tried it,
    or the hash check that runs now). None when it holds no committed checkpoint, or one that verifies."""
    infos = list_checkpoints(store, save_dir) if infos is None else infos
    found = []
    for info in sorted((i for i in infos if i.committed), key=lambda i: (i.position, i.order), reverse=True):
        text = problem(store, info)
        if text is None:
            return None
        found.append(f"{info.name} ({text})")
    return "; ".join(found) or None


def none_loads(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None) -> str | None:
    """The refusal for a run that would start over in a save_dir whose committed checkpoints are all damaged
    (all_damaged), with the ways out; None when there is nothing to refuse."""
    each = all_damaged(store, save_dir, infos)
    if each is None:
        return None
    return (f"save_dir {save_dir} holds committed checkpoints and none of them loads: {each}. Nothing in it was "
            "changed. Resume from a checkpoint elsewhere (--resume_from PATH), train into a new --save_dir, or "
            f"see every damaged file with `dcp-resume verify {save_dir}`")


def latest_verified(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None
                    ) -> CheckpointInfo | None:
    """The newest complete checkpoint whose files all match their content hashes (`dcp-resume latest`).

    Every damaged checkpoint passed over gets a warning naming it and the file: a complete one that fails
    its hashes, and one whose metadata.json is there but does not parse or lists missing or resized files.
    (A directory without metadata.json is an interrupted save, not damage: skipped quietly.) `infos`: save_dir's
    list_checkpoints() when the caller already has it."""
    infos = list_checkpoints(store, save_dir) if infos is None else infos
    warn_damaged(infos)
    for info in sorted((i for i in infos if i.complete), key=lambda i: i.order, reverse=True):
        found = problem(store, info)
        if found is None:
            return info
        logger.warning("Skipping checkpoint %s: %s", info.path, found)
    return None
