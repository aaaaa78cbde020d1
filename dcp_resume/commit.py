"""The commit protocol, top to bottom: how one checkpoint goes from live state to a committed directory.

1. prepare (rank 0): refuse to overwrite a committed checkpoint (a final save at its step relabels it
   instead), never write through a symlink, drop an interrupted save at the target (a damaged checkpoint only
   when the run resumed from a verified one), check free space, make `state/`.
2. write (every rank): DCP writes this rank's shards into `state/`; each rank reports the sizes and content
   hashes of the files it wrote to rank 0, with its rank and host.
3. commit (rank 0): check that every reported file is there with its size (a save_dir that is not one
   filesystem for every node fails here), side files (config.json, training_stats.json, artifacts), fsync
   `state/`, check that this job still holds the save_dir lock, then metadata.json by temp file + fsync +
   rename, then fsync save_dir. The checkpoint exists from that rename on, never before: a crash at any
   earlier point leaves a directory without metadata.json, which no reader loads and the next save removes.
4. on failure: every rank raises one CheckpointSaveError naming the step and the cause (a full disk, a rank
   that died or hung); rank 0 removes the uncommitted directory at once. Older checkpoints are never touched.

Retention, locking and the executor for async saves are the manager's; this module only moves one checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Callable

from torch.distributed.checkpoint import CheckpointException

from . import artifacts as artifacts_mod
from . import dcp_io, disk_guard, hashing, incremental, integrity, layout, savedir_lock
from .distributed import CommitGroup, first_line, peer_failure, rank, world_size
from .errors import CheckpointExistsError, CheckpointSaveError
from .logs import logger
from .storage import Storage

WRITE, SKIP, RELABEL = "write", "skip", "relabel"  # what prepare() decided


def prepare(store: Storage, path: str, kind: str, *, save_dir: str, last_bytes: int | None, low_disk_policy: str,
            resumed: bool, before_first_write: Callable[[], None]) -> str:
    """Rank 0, lock held: WRITE (state/ made), SKIP (a periodic save skipped for lack of disk space) or
    RELABEL (a final save at the step of a committed checkpoint, which then becomes the final one).
    A damaged checkpoint at the target is replaced only by a run that `resumed` from a verified one.
    `before_first_write` runs once the target is known not to be a committed checkpoint."""
    if store.is_link(path):  # never write a checkpoint through a link (it may point outside save_dir)
        logger.warning("Removing the symlink %s (it is not a checkpoint; its target is left alone)", path)
        store.remove_file(path)
    info = layout.inspect_dir(store, path)
    damage = integrity.problem(store, info) if info.committed else None
    if info.complete and damage is None:
        if kind == "final":
            return RELABEL
        raise CheckpointExistsError(
            f"{path} already holds a committed checkpoint (step {info.step}, kind "
            f"{info.meta.get('kind')}); refusing to overwrite it. Save this step once (a final save at "
            "its step marks it final), or use a new save_dir")
    if damage is not None and not resumed:
        raise CheckpointExistsError(
            f"{path} holds a damaged checkpoint ({damage}); a run replaces a damaged checkpoint only after it "
            "resumed from a verified one. Resume first (--auto_resume, or load_checkpoint()), or save to a new "
            "save_dir")
    before_first_write()
    if damage is not None:
        logger.warning("Replacing checkpoint %s, which fails verification: %s", path, damage)
    elif info.reason != layout.NO_DIR:
        logger.info("Removing incomplete checkpoint before rewriting it: %s (%s)", path, info.reason)
    if info.reason != layout.NO_DIR:
        store.remove_tree(path)
    short = disk_guard.shortfall(store, save_dir, last_bytes)
    if short is not None:
        why = disk_guard.describe(store, save_dir, *short)
        if kind in ("preemption", "final"):
            logger.warning("LOW DISK SPACE: %s. Attempting the %s checkpoint anyway", why, kind)
        elif low_disk_policy == "skip":
            logger.warning("LOW DISK SPACE: skipping the %s checkpoint %s: %s", kind, path, why)
            return SKIP
        else:
            raise CheckpointSaveError(f"not saving {path}: {why} (low_disk_policy='fail')")
    store.makedirs(os.path.join(path, layout.STATE_DIR))
    return WRITE


def write_and_commit(store: Storage, payload: dict, extras: dict, path: str, commit: dict, group: CommitGroup,
                     save_dir: str, reuse: incremental.Reuse | None = None) -> int:
    """Steps 2-4 on every rank (inline for sync saves, on the background thread for async ones). `payload`
    holds what changed; `reuse` names what the previous checkpoint holds instead (rank 0 links it into
    state/ and its DCP index). Returns the bytes the committed checkpoint's files take; raises
    CheckpointSaveError with nothing committed."""
    step = commit["step"]
    state_dir = os.path.join(path, layout.STATE_DIR)
    try:
        with failures_named(f"save of step {step} to {path}", store, save_dir, group.timeout_s):
            written = dcp_io.save(store, payload, state_dir, group.group)
            linked = {}
            if reuse is not None and reuse.base is not None:
                linked = group.run_on_rank0(lambda: incremental.merge_index(store, state_dir, reuse))
            mine = {f"{layout.STATE_DIR}/{n}": hashing.file_info(store, os.path.join(state_dir, n),
                                                                 written.get(n, ()))  # + each item's hash
                    for n in dcp_io.shard_files_of_rank(store, state_dir, rank())}
            if rank() == 0:
                mine.update(linked)
            reported = group.gather({"rank": rank(), "host": socket.gethostname(), "files": mine})
        with failures_named(f"commit of step {step} to {path}", store, save_dir, group.timeout_s):
            return group.run_on_rank0(lambda: _commit(store, path, reported, save_dir=save_dir, extras=extras,
                                                      **commit))
    except BaseException as e:
        # Every rank is past its writes once an error is shared; rank 0 drops the uncommitted directory
        # (e.g. after ENOSPC) so it takes no space.
        if isinstance(e, OSError):  # a disk error (ENOSPC, EIO) while writing side files or the commit
            full = disk_guard.disk_full(e, store, save_dir)
            cause = str(e) if full is None else f"{full} ({e})"  # the OS's own words once, either way
            e = CheckpointSaveError(f"save of step {step} to {path} failed: {cause}. The previous checkpoint "
                                    "stays the latest")
        if rank() == 0 and not store.exists(os.path.join(path, layout.METADATA_FILE)):
            store.remove_tree(path)
        raise e


def _commit(store: Storage, path: str, reported: list[dict], *, save_dir: str, step, epoch, kind, is_best, metrics,
            best_metric, config, training_stats, extras, fingerprints=None) -> int:
    """Rank 0, after every rank wrote its shards: check it sees them, side files, then metadata.json last, if
    this job still holds save_dir's lock."""
    _check_visible(store, path, reported, save_dir=save_dir, step=step)
    files: dict[str, dict] = {}
    for report in reported:
        files.update(report["files"])
    side = {layout.CONFIG_FILE: config, layout.STATS_FILE: training_stats}
    for name, obj in side.items():
        store.write_json_durably(os.path.join(path, name), obj)
    for name, data in artifacts_mod.encode(extras).items():
        store.write_durably(os.path.join(path, name), data)
    on_disk = store.list_files(path)
    for rel in on_disk:
        if rel not in files and not rel.startswith(layout.STATE_DIR + "/"):
            files[rel] = hashing.file_info(store, os.path.join(path, rel))
    unlisted = [rel for rel in on_disk if rel not in files]
    if unlisted or dcp_io.DCP_METADATA not in {r.rsplit("/", 1)[-1] for r in files}:
        raise CheckpointSaveError(f"save of step {step} left files no rank reported ({unlisted}) or no "
                                  f"DCP .metadata in {path}/state; not committing it")
    store.sync_dir(os.path.join(path, layout.STATE_DIR))
    lost = savedir_lock.lost(store, save_dir)
    if lost is not None:
        raise CheckpointSaveError(f"not committing step {step} to {path}: {lost}")
    meta = layout.build_metadata(step=step, epoch=epoch, kind=kind, world_size=world_size(),
                                 is_best=is_best, metrics=metrics, best_metric=best_metric, files=files,
                                 fingerprints=fingerprints)
    store.commit_json_atomically(os.path.join(path, layout.METADATA_FILE), meta)
    store.sync_dir(save_dir)
    return sum(info["size"] for info in files.values())


def _check_visible(store: Storage, path: str, reported: list[dict], *, save_dir: str, step) -> None:
    """Rank 0 commits only files it can see with the size their rank wrote: on a save_dir each node has its
    own copy of (node-local disk), metadata.json would list other nodes' shards that no resume finds here."""
    seen = store.file_sizes(path) or {}
    for report in reported:
        for rel, info in report["files"].items():
            if seen.get(rel) != info["size"]:
                what = "missing" if rel not in seen else f"{seen[rel]} bytes, not the {info['size']} written"
                raise CheckpointSaveError(
                    f"save of step {step} not committed: {os.path.join(path, rel)}, written by rank "
                    f"{report['rank']} on host {report['host']}, is {what} on rank 0's host "
                    f"{socket.gethostname()}, so not every rank writes to the same save_dir {save_dir}. save_dir "
                    "must be a filesystem every node mounts (or an object store such as s3://)")


def relabel_as_final(store: Storage, path: str, extras: dict, commit: dict, save_dir: str) -> None:
    """Rank 0: the checkpoint at this step already holds this step's state, so the final save records it
    as final: new artifacts are added (existing files are never rewritten), then metadata.json is
    replaced atomically with kind 'final' and the final save's metrics. A crash leaves the old commit."""
    meta = dict(layout.inspect_dir(store, path).meta)
    files = dict(meta["files"])
    for name, data in artifacts_mod.encode(extras).items():
        if name not in files:
            store.write_durably(os.path.join(path, name), data)
            files[name] = hashing.file_info(store, os.path.join(path, name))
    meta.update(kind="final", is_best=bool(commit["is_best"]) or bool(meta.get("is_best")),
                metrics={**(meta["metrics"] if isinstance(meta.get("metrics"), dict) else {}),
                         **(commit["metrics"] or {})},
                best_metric=commit["best_metric"], files=files, relabeled_at=layout.utc_now_iso())
    store.commit_json_atomically(os.path.join(path, layout.METADATA_FILE), meta)
    store.sync_dir(save_dir)
    logger.info("Marked checkpoint %s as final (it already holds step %s)", path, commit["step"])


@contextlib.contextmanager
def failures_named(what: str, store: Storage, save_dir: str, timeout_s: float):
    """A collective or DCP failure (a rank died, hung past collective_timeout_s, or hit a write error)
    becomes one CheckpointSaveError naming the step and the cause, on every surviving rank."""
    try:
        yield
    except (RuntimeError, CheckpointException) as e:
        if isinstance(e, CheckpointSaveError):
            raise
        detail = first_line(e)
        full = disk_guard.disk_full(e, store, save_dir)  # before rank 0 removes the partial directory
        if full is not None:
            cause = f"{full} ({detail})"
        else:
            cause = (f"{detail}. Another rank {'has' if peer_failure(e) else 'may have'} died or hung "
                     f"(collectives wait at most collective_timeout_s={timeout_s:g}s)")
        raise CheckpointSaveError(f"{what} failed on rank {rank()}: {cause}; the previous checkpoint stays "
                                  "the latest") from e
