"""The on-disk format (docs/FORMAT.md): directory names, metadata.json, completeness, discovery."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .storage import Storage
from .untrusted import is_count

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
STATE_DIR = "state"
CONFIG_FILE = "config.json"
STATS_FILE = "training_stats.json"
KINDS = ("step", "epoch", "preemption", "final")
RESERVED_NAMES = {METADATA_FILE, METADATA_FILE + ".tmp", STATE_DIR, CONFIG_FILE, STATS_FILE}
CHECKPOINT_NAME = re.compile(r"^(step_\d+|epoch\d+)$")
NO_DIR = "directory does not exist"
NO_COMMIT = "no metadata.json (save interrupted before its commit)"
REQUIRED_KEYS = ("format_version", "step", "epoch", "timestamp", "world_size", "kind", "is_best",
                 "metrics", "best_metric", "files")


def checkpoint_name(kind: str, step: int, epoch: int) -> str:
    """epoch checkpoints live in epoch<N>/, every other kind in step_<N>/."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    return f"epoch{epoch}" if kind == "epoch" else f"step_{step}"


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


MAX_STEP = 2**63 - 1  # what DCP and every counter here can hold


def _timestamp_key(ts: Any) -> float:
    try:
        return _dt.datetime.fromisoformat(str(ts)).timestamp()
    except (ValueError, OverflowError, OSError):
        return float("-inf")


def _is_bounded_count(value: Any, least: int) -> bool:
    """A JSON integer (not a bool, not a float such as 1e400) in [least, MAX_STEP]."""
    return is_count(value) and least <= value <= MAX_STEP


@dataclass
class CheckpointInfo:
    """One step_*/epoch* directory and whether it is complete (DESIGN.md: metadata.json decides)."""

    path: str
    complete: bool
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    on_disk: dict[str, int] = field(default_factory=dict)  # every file under it -> size, as listed

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    @property
    def committed(self) -> bool:
        """metadata.json is there (in some form): a checkpoint that existed. One that is not complete is damaged,
        never an interrupted save: not loaded, and not removed unless a newer complete one exists."""
        return self.complete or self.reason not in (NO_COMMIT, NO_DIR)

    @property
    def position(self) -> int:
        """Its step for ordering, even when metadata.json is damaged: the recorded step, else the one in a
        step_<N> name, else -1 (unknown)."""
        if "step" in self.meta:
            return self.step
        match = re.match(r"step_(\d+)$", self.name)
        return int(match.group(1)) if match else -1

    @property
    def step(self) -> int:
        step = self.meta.get("step")
        return step if _is_bounded_count(step, 0) else -1

    @property
    def order(self) -> tuple[int, float]:
        """Latest = highest step, ties broken by the newest timestamp."""
        return (self.step, _timestamp_key(self.meta.get("timestamp")))


def listed_bytes(files: Any) -> int:
    """The sizes metadata.json records for its files, summed (entries without an integer size count 0)."""
    if not isinstance(files, dict):
        return 0
    return sum(i["size"] for i in files.values() if isinstance(i, dict) and _is_bounded_count(i.get("size"), 0))


def _safe_relpath(rel: str) -> bool:
    parts = rel.replace("\\", "/").split("/")
    return bool(rel) and not os.path.isabs(rel) and ".." not in parts


def inspect_dir(store: Storage, path: str) -> CheckpointInfo:
    """Completeness check: metadata.json parses and lists files that exist with the recorded sizes.
    One listing of the directory (one LIST request on an object store) plus the read of metadata.json; the
    listing is kept in `on_disk` for callers that need the directory's files and sizes too."""
    present = store.file_sizes(path)
    complete, reason, meta = _judge(store, path, present)
    return CheckpointInfo(path, complete, reason, meta, present or {})


def _judge(store: Storage, path: str, present: dict[str, int] | None) -> tuple[bool, str, dict[str, Any]]:
    if present is None:
        return False, NO_DIR, {}
    if METADATA_FILE not in present:
        marker = os.path.join(path, METADATA_FILE)
        if store.is_link(marker) or store.exists(marker):  # there, but a FIFO, device, socket or symlink
            return False, "metadata.json is not a regular file (a FIFO, device, socket or symlink)", {}
        return False, NO_COMMIT, {}
    try:
        meta = store.read_json(os.path.join(path, METADATA_FILE))
    except (ValueError, OSError) as e:
        return False, f"metadata.json does not parse ({type(e).__name__})", {}
    if not isinstance(meta, dict):
        return False, "metadata.json is not a JSON object", {}
    lacking = [k for k in REQUIRED_KEYS if k not in meta]
    if lacking:
        return False, f"metadata.json lacks {', '.join(lacking)}", meta
    for key, least in (("step", 0), ("epoch", 0), ("world_size", 1)):
        if not _is_bounded_count(meta[key], least):
            return False, f"metadata.json {key} is {json.dumps(meta[key])[:40]}, not an integer >= {least}", meta
    files = meta["files"]
    if not isinstance(files, dict) or not files:
        return False, "metadata.json lists no files", meta
    for rel, info in sorted(files.items()):
        if not _safe_relpath(rel):
            return False, f"metadata.json lists a path outside the checkpoint: {rel}", meta
        if rel not in present:
            return False, f"listed file missing: {rel}", meta
        size = info.get("size") if isinstance(info, dict) else None
        if size != present[rel]:
            return False, f"size mismatch: {rel} is {present[rel]} bytes, metadata.json says {size}", meta
    return True, "", meta


def by_position(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """By step (ties: timestamp); an uncommitted directory by the step in its name (step_600), else first."""
    def key(info: CheckpointInfo) -> tuple:
        return (info.position, info.order[1], info.name)

    return sorted(infos, key=key)


def list_checkpoints(store: Storage, save_dir: str) -> list[CheckpointInfo]:
    """Every step_*/epoch* directory in save_dir, complete or not; complete ones sorted oldest first."""
    infos = [inspect_dir(store, os.path.join(save_dir, n)) for n in store.listdir(save_dir, dirs_only=True)
             if CHECKPOINT_NAME.match(n)]
    return sorted(infos, key=lambda i: (i.complete, i.order, i.name))


def latest_complete(store: Storage, save_dir: str, infos: list[CheckpointInfo] | None = None
                    ) -> CheckpointInfo | None:
    """The newest complete checkpoint by the cheap check (sizes): for listings. Resume uses integrity.latest_verified.
    `infos`: save_dir's list_checkpoints() when the caller already has it."""
    complete = [i for i in (list_checkpoints(store, save_dir) if infos is None else infos) if i.complete]
    return max(complete, key=lambda i: i.order) if complete else None


def build_metadata(*, step: int, epoch: int, kind: str, world_size: int, is_best: bool,
                   metrics: dict | None, best_metric: Any, files: dict[str, dict],
                   fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "timestamp": utc_now_iso(),
        "world_size": int(world_size),
        "kind": kind,
        "is_best": bool(is_best),
        "metrics": dict(metrics or {}),
        "best_metric": best_metric,
        "files": files,
        "torch_version": torch.__version__,
        "dcp_resume_version": __version__,
    }
    if fingerprints:
        meta["fingerprints"] = fingerprints  # incremental.py: what the next save compares its tensors with
    return meta
