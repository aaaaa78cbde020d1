"""Every problem of one checkpoint directory, not just the first: what `dcp-resume verify` reports.

integrity.problem stops at the first bad file (enough to skip a checkpoint on resume); this reads all of them
and also cross-checks state/ against DCP's own index (`state/.metadata`): every `*.distcp` there is one DCP
reads, every file DCP reads exists and is long enough, every item DCP lists has its bytes somewhere, and
every file in state/ is covered by metadata.json's sizes and hashes. Nothing is unpickled unsafely
(dcp_io.read_metadata) and no tensor is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from . import dcp_io, hashing, layout
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .storage import Storage

STATUSES = ("ok", "bad", "incomplete")  # incomplete: an interrupted save (no metadata.json), never loaded


@dataclass
class Report:
    path: str
    status: str = "ok"
    note: str = ""  # why a directory is incomplete
    problems: dict[str, list[str]] = field(default_factory=dict)  # file relative to path -> what is wrong
    files: int = 0  # files metadata.json lists
    bytes: int = 0  # their recorded sizes
    shards: int = 0  # *.distcp files DCP's index reads
    unhashed: int = 0  # listed files without a hash known here (checked by size only)
    unknown_hashes: set[str] = field(default_factory=set)  # hash keys recorded that this version does not know

    def add(self, rel: str, problem: str) -> None:
        self.problems.setdefault(rel, []).append(problem)
        self.status = "bad"


def verify_checkpoint(store: Storage, path: str, quick: bool = False) -> Report:
    """Check sizes (and, unless quick, content hashes) of every listed file, then DCP coverage of state/."""
    report = Report(path)
    info = layout.inspect_dir(store, path)
    present = info.on_disk  # one listing: every file under the checkpoint and its size
    if layout.METADATA_FILE not in present and info.reason == layout.NO_COMMIT:
        report.status, report.note = "incomplete", layout.NO_COMMIT
        return report
    files = info.meta.get("files")
    if not isinstance(files, dict) or not files:
        report.add(layout.METADATA_FILE, info.reason or "lists no files")
        return report
    if not info.complete and info.reason.startswith(layout.METADATA_FILE):  # its own damage (garbage step, ...)
        report.add(layout.METADATA_FILE, info.reason)
    report.files, report.bytes = len(files), layout.listed_bytes(files)
    hashed = [] if quick else [rel for rel, entry in sorted(files.items()) if layout._safe_relpath(rel)
                               and hashing.recorded(entry) is not None and present.get(rel) == entry.get("size")]

    def digest_of(rel: str) -> tuple[int, str]:
        return hashing.file_digest(store, os.path.join(path, rel), hashing.recorded(files[rel])[0])
    digests = dict(zip(hashed, hashing.in_parallel(digest_of, hashed)))  # several files at once
    for rel, entry in sorted(files.items()):
        _check_file(report, rel, entry if isinstance(entry, dict) else {}, present.get(rel), quick, digests.get(rel))
    _check_dcp_coverage(store, report, set(files), present)
    return report


def _check_file(report: Report, rel: str, entry: dict, size: int | None, quick: bool, digest) -> None:
    """`digest`: (size, hex digest) of the file as read, or the OSError reading it raised."""
    if not layout._safe_relpath(rel):
        report.add(rel, "listed in metadata.json with a path outside the checkpoint")
        return
    if size is None:
        report.add(rel, "listed in metadata.json but missing")
        return
    if size != entry.get("size"):
        report.add(rel, f"size mismatch: the file is {size} bytes, metadata.json says {entry.get('size')}")
        return
    found = hashing.recorded(entry)
    if found is None:
        report.unhashed += 1
        report.unknown_hashes.update(hashing.unknown_keys(entry))
        return
    if quick:
        return
    algorithm, want = found
    if isinstance(digest, BaseException):
        report.add(rel, f"unreadable ({getattr(digest, 'strerror', None) or digest})")
        return
    _, got = digest
    if got != want:
        report.add(rel, f"content hash mismatch ({algorithm} of the file is {got}, metadata.json records {want})")


def dcp_problem(store: Storage, info: layout.CheckpointInfo) -> str | None:
    """The first problem of a complete checkpoint's state/ against DCP's index (unsafe or unreadable
    .metadata, shards outside state/ or missing, truncated, unlisted), as '<file>: <what>'; None if none."""
    report = Report(info.path)
    files = info.meta.get("files")
    _check_dcp_coverage(store, report, set(files) if isinstance(files, dict) else set(), info.on_disk)
    for rel, problems in sorted(report.problems.items()):
        return f"{rel}: {problems[0]}"
    return None


def _check_dcp_coverage(store: Storage, report: Report, listed: set[str], present: dict[str, int]) -> None:
    state = layout.STATE_DIR + "/"
    index_rel = state + dcp_io.DCP_METADATA
    in_state = {rel[len(state):]: size for rel, size in present.items() if rel.startswith(state)}
    if not in_state:
        report.add(state, "missing or empty: the checkpoint holds no DCP state")
        return
    if dcp_io.DCP_METADATA not in in_state:
        if index_rel not in report.problems:
            report.add(index_rel, "missing: DCP's index of the shards")
        return
    try:
        meta = dcp_io.read_metadata(store, os.path.join(report.path, layout.STATE_DIR), shared=True)
    except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
        report.add(index_rel, str(e))
        return
    reads: dict[str, int] = {}  # shard -> the last byte DCP's index reads from it
    for where in meta.storage_data.values():
        reads[where.relative_path] = max(reads.get(where.relative_path, 0), where.offset + where.length)
    report.shards = len(reads)
    for name in sorted(in_state.keys() - reads.keys()):
        if name.endswith(dcp_io.SHARD_SUFFIX):
            report.add(state + name, "a shard that state/.metadata does not reference (not written by the save "
                                     "that wrote the index)")
    for name, end in sorted(reads.items()):
        if state + name in report.problems:
            continue
        if name not in in_state:
            report.add(state + name, "referenced by state/.metadata but missing")
        elif in_state[name] < end:
            report.add(state + name, f"truncated: state/.metadata reads up to byte {end}, the file has "
                                     f"{in_state[name]}")
    for name in sorted(in_state):
        if state + name not in listed:
            report.add(state + name, "not listed in metadata.json (no recorded size or hash covers it)")
    unstored = [fqn for fqn, md in meta.state_dict_metadata.items() if not _stored(meta.storage_data, fqn, md)]
    if unstored:
        report.add(index_rel, f"{len(unstored)} item(s) have no stored bytes (first: {unstored[0]})")


def _stored(storage_data: dict, fqn: str, md) -> bool:
    if isinstance(md, TensorStorageMetadata):
        return all(MetadataIndex(fqn, chunk.offsets) in storage_data for chunk in md.chunks)
    return MetadataIndex(fqn) in storage_data
