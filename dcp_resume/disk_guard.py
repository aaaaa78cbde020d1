"""Is there room for the next checkpoint? Estimated from the size of the latest complete one.

A periodic save that would run out of disk half way only produces an incomplete directory (and, on a
shared filesystem, trouble for everyone else); skipping it keeps the previous checkpoint as the latest.
"""
from __future__ import annotations

import errno

from . import layout
from .distributed import causes
from .storage import Storage

MARGIN = 1.1  # the next checkpoint may be a little larger (optimizer state appears, stats grow)


def shortfall(store: Storage, save_dir: str, last_bytes: int | None = None) -> tuple[int, int] | None:
    """(bytes needed, bytes free) when the free space in save_dir is below the estimate, else None.
    The estimate is the size of the last checkpoint: `last_bytes` (the writer's own last commit, so a save
    lists nothing) or else the latest complete one on disk. No estimate before the first checkpoint, and no
    check where free space is unknown (object stores)."""
    free = store.free_bytes(save_dir)
    if free is None:
        return None
    if last_bytes is None:
        latest = layout.latest_complete(store, save_dir)
        if latest is None:
            return None
        last_bytes = layout.listed_bytes(latest.meta["files"])
    needed = int(MARGIN * last_bytes)
    return (needed, free) if free < needed else None


def describe(store: Storage, save_dir: str, needed: int, free: int) -> str:
    return (f"only {free / 1e9:.2f} GB free in {store.absolute(save_dir)}, and the next checkpoint needs about "
            f"{needed / 1e9:.2f} GB (the last one plus 10%); free space or lower --keep_last_n")


FULL_BELOW = 1 << 20  # a write that failed with less than this free: the disk was full, whatever the error said


def disk_full(e: BaseException, store: Storage, save_dir: str) -> str | None:
    """'no space left on device ...' when e (or what it wraps) is ENOSPC, or when save_dir's filesystem is
    full now: torch.save's zip writer reports a full disk only as 'unexpected pos N vs M', without errno."""
    enospc = any(isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or
                 "No space left on device" in str(exc) for exc in causes(e))
    try:
        free = store.free_bytes(save_dir)
    except OSError:
        free = None
    if not enospc and (free is None or free >= FULL_BELOW):
        return None
    left = "" if free is None else f" ({free / 1e6:.1f} MB free now)"
    return (f"no space left on device (ENOSPC) in {store.absolute(save_dir)}{left}; free space, lower "
            "--keep_last_n or save to another save_dir")
