"""How the ranks of a resume share the verification of the checkpoint they load, and agree on it.

Every byte a load uses is checked once, by the rank that reads it, as it reads it: a shard's items against
their recorded hashes (verified_read.py), DCP's index (state/.metadata) as each rank reads it. What no load
reads item by item (config.json, training_stats.json, artifacts, and shards saved before item hashes
existed) is hashed whole beforehand, split over the ranks by size (`shares`): a shard __<r>_*.distcp goes
to rank r, which is the rank that reads it on a resume at the same world size. So no rank reads more than
about 1/world of the checkpoint for verification beyond what its own load reads, and a single process
hashes several files at once (integrity.hash_problem's threads).

The ranks agree without a collective of their own: a rank whose share or whose template fails
(`share_and_prepare`) raises it in DCP's plan exchange, before any shard is read, and one that finds a bad
item raises it in DCP's read step; DCP hands either to every rank (the first failing rank's error on all),
so they fall back to the previous checkpoint together.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from . import hashing, integrity
from .dcp_io import DCP_METADATA
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
)
from .layout import METADATA_FILE, STATE_DIR, CheckpointInfo, inspect_dir, list_checkpoints, listed_bytes
from .storage import Storage
from .verified_read import Expected

_OWNER = re.compile(rf"^{STATE_DIR}/__(\d+)_\d+")


@dataclass
class LoadStats:
    """Where the last load_checkpoint's time went, on this rank (`CheckpointManager.load_stats`)."""

    path: str | None = None  # the checkpoint loaded
    discovery_s: float = 0.0  # choosing the checkpoint: listing, metadata.json, DCP's index
    verify_s: float = 0.0  # hashing this rank's share of the whole files
    load_s: float = 0.0  # DCP's load, items verified as they are read
    hashed_bytes: int = 0  # bytes this rank hashed: its share of whole files + the items and index it read
    checkpoint_bytes: int = 0  # the loaded checkpoint's files, all of them
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over, newest first

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def expectations(info: CheckpointInfo) -> tuple[Expected, list[str]]:
    """(what a load of `info` may trust as it reads, the files to hash whole before it), from metadata.json."""
    files = info.meta.get("files") or {}
    expected = Expected(os.path.join(info.path, STATE_DIR))
    whole = []
    prefix = STATE_DIR + "/"
    for rel, entry in sorted(files.items()):
        if rel == prefix + DCP_METADATA:
            expected.metadata = hashing.recorded(entry)  # None: sizes only
            continue
        if rel.startswith(prefix):
            name = rel[len(prefix):]
            items = hashing.recorded_items(entry)
            if items is not None:
                expected.items[name] = items
                continue
            expected.trusted.add(name)  # hashed whole below (or, carrying no known hash, checked by size only)
        whole.append(rel)
    return expected, whole


def shares(files: dict, whole: list[str], world: int) -> list[list[str]]:
    """`whole` split over `world` ranks: a shard __<r>_* to rank r (r < world), the rest largest first to the
    rank with the fewest bytes so far. The same on every rank (it depends only on metadata.json)."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]

    def size(rel: str) -> int:
        entry = files.get(rel)
        return listed_bytes({rel: entry})

    rest = []
    for rel in whole:
        owner = _OWNER.match(rel)
        if owner and int(owner.group(1)) < world:
            r = int(owner.group(1))
            out[r].append(rel)
            load[r] += size(rel)
        else:
            rest.append(rel)
    for rel in sorted(rest, key=lambda r: (-size(r), r)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(rel)
        load[r] += size(rel)
    return out


def _hash_share(store: Storage, info: CheckpointInfo, share: list[str]) -> tuple[str | None, int]:
    """(what is wrong with the files of `share`, or None; bytes hashed)."""
    files = info.meta.get("files") or {}
    try:
        return integrity.hash_problem(store, info.path, {rel: files[rel] for rel in share}, note=False)
    except OSError as e:
        where = os.path.relpath(e.filename, info.path) if isinstance(e.filename, str) else "a listed file"
        return f"{where} unreadable ({e.strerror or e})", 0


def share_and_prepare(store: Storage, info: CheckpointInfo, rank: int, world: int, stats: LoadStats,
                      prepare) -> tuple[Expected, object, Exception | None]:
    """This rank hashes its share, then runs `prepare(expected)` (reading DCP's index and building the load's
    template): (expected, prepare's result, the refusal this rank found or None). The refusal is an
    UnsafeCheckpointError or a CorruptCheckpointError naming the file, or the TypeError/ValueError (such as
    CheckpointMismatchError) that the live objects raised; no collective here: dcp_io.load raises it in DCP's own
    plan exchange, which hands it to every rank before any shard is read."""
    t0 = time.perf_counter()
    expected, whole = expectations(info)
    files = info.meta.get("files") or {}
    problem, read = _hash_share(store, info, shares(files, whole, world)[rank])
    if rank == 0 and problem is None:
        integrity.note_unhashed(info.path, files)
    stats.hashed_bytes += read
    stats.verify_s += time.perf_counter() - t0
    if problem is not None:
        return expected, None, integrity.corrupt(info.path, "hash", problem)
    t1 = time.perf_counter()
    try:
        return expected, prepare(expected), None
    except UnsafeCheckpointError as e:
        return expected, None, e
    except CorruptCheckpointError as e:
        return expected, None, integrity.corrupt(info.path, "hash", str(e))
    except (TypeError, ValueError) as e:  # the live objects do not fit (CheckpointMismatchError, a bad key): raised
        return expected, None, e  # on every rank alike, where the other ranks would wait for this one in DCP
    finally:
        stats.load_s += time.perf_counter() - t1


def named_checkpoint(store: Storage, path: str, check_index: bool) -> CheckpointInfo:
    """The checkpoint at a path the caller named, with the messages users know (CheckpointNotFoundError,
    IncompleteCheckpointError; with `check_index`, CorruptCheckpointError when state/ does not match DCP's index).
    Contents are not read yet: the load verifies them."""
    if store.is_link(path):  # a path the user named (e.g. runs/latest -> step_900): follow it, once
        path = os.path.realpath(path)
    if store.isfile(path):
        raise CheckpointNotFoundError(f"Checkpoint path is a file, not a checkpoint directory: {path}")
    if not store.isdir(path):
        raise CheckpointNotFoundError(f"Checkpoint path does not exist: {path}")
    if not store.exists(os.path.join(path, METADATA_FILE)) and list_checkpoints(store, path):
        raise CheckpointNotFoundError(
            f"{path} is a save_dir, not a checkpoint; name one of its step_*/epoch* directories, or "
            "resume from the latest with --auto_resume --save_dir " + path)
    state_dir = os.path.join(path, STATE_DIR)
    if not store.listdir(state_dir):
        raise CheckpointNotFoundError(
            f"State file not found: {state_dir} is missing or empty; the save was interrupted or this "
            "is not a dcp-resume checkpoint. List complete ones with `dcp-resume ls <save_dir>`")
    info = inspect_dir(store, path)
    if not info.complete:
        raise IncompleteCheckpointError(
            f"{path} is not a complete checkpoint ({info.reason}); it was never committed or has lost "
            "files. Resume from a complete one (`dcp-resume ls <save_dir>`)")
    if check_index:  # a discovered checkpoint was checked already
        integrity.check_index(store, info)
    return info
