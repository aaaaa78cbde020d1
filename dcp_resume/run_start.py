"""Checks before a run writes into a save_dir: it is a directory this process can write, and it holds no
checkpoint ahead of where the run starts (whose step numbers the run would reuse, and which retention,
keeping the highest steps, would let push out the run's own new checkpoints)."""
from __future__ import annotations

import os

from . import integrity, layout, storage
from .errors import CheckpointExistsError, StorageError


def check_writable(save_dir: str) -> None:
    """StorageError naming save_dir unless it is (or can be created as) a writable directory. URLs were
    checked when the manager was built (storage.check_reachable)."""
    if storage.is_url(save_dir):
        return
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise StorageError(f"save_dir {save_dir} is a file, not a directory; pass a directory for the checkpoints "
                           "(it is created if missing)")
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise StorageError(f"save_dir {save_dir} cannot be created: {e.strerror or e}; pass a save_dir on a "
                           "writable filesystem") from None
    if not os.access(save_dir, os.W_OK):  # access() also says so for a read-only mount, even to root
        raise StorageError(f"save_dir {save_dir} is not writable (a read-only filesystem or no permission); "
                           "pass a save_dir on a writable filesystem")


def check_no_newer(save_dir: str, resume_from: str | None) -> None:
    """CheckpointExistsError when save_dir holds a verified checkpoint at a higher step than the one this run
    starts from (step 0 without resume_from). Damaged ones do not count: the run's saves replace them."""
    start = 0 if resume_from is None else layout.inspect_dir(resume_from).step
    ahead = [i for i in layout.list_checkpoints(save_dir) if i.complete and i.step > start]
    newest = next((i for i in sorted(ahead, key=lambda i: i.order, reverse=True) if integrity.problem(i) is None),
                  None)
    if newest is None:
        return
    held = f"save_dir {save_dir} already holds {newest.name} (step {newest.step})"
    if resume_from is None:
        raise CheckpointExistsError(
            f"{held}; a new run starting at step 0 would reuse its step numbers. Continue that run "
            "(--auto_resume, or load_checkpoint()), or save this one to a new save_dir")
    raise CheckpointExistsError(
        f"{held}, newer than {resume_from} (step {start}) where this run starts; its saves would collide with "
        "the newer checkpoints. Continue from the newest (--auto_resume), or give the rewound run a new save_dir")
