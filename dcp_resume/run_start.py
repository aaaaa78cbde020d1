"""Checks before a run writes into a save_dir: it is a directory this process can write (or a reachable
bucket), and it holds no checkpoint ahead of where the run starts (whose step numbers the run would reuse,
and which retention, keeping the highest steps, would let push out the run's own new checkpoints)."""
from __future__ import annotations

from . import integrity, layout
from .errors import CheckpointExistsError
from .storage import Storage


def check_no_newer(store: Storage, save_dir: str, resume_from: str | None, start: int) -> None:
    """CheckpointExistsError when save_dir holds a verified checkpoint at a higher step than `start`, the step
    of resume_from (the checkpoint this run starts from; None and 0 for a fresh run). Damaged ones newer than
    resume_from do not count: a run that resumed from a verified checkpoint replaces them. A fresh run is also
    refused when save_dir holds committed checkpoints none of which loads (integrity.none_loads): damage is
    never a reason to start over, nor to delete the evidence."""
    infos = layout.list_checkpoints(store, save_dir)
    ahead = [i for i in infos if i.complete and i.step > start]
    newest = next((i for i in sorted(ahead, key=lambda i: i.order, reverse=True)
                   if integrity.problem(store, i) is None), None)
    if newest is None:
        refusal = integrity.none_loads(store, save_dir, infos) if resume_from is None else None
        if refusal is not None:
            raise CheckpointExistsError(refusal)
        return
    held = f"save_dir {save_dir} already holds {newest.name} (step {newest.step})"
    if resume_from is None:
        raise CheckpointExistsError(
            f"{held}; a new run starting at step 0 would reuse its step numbers. Continue that run "
            "(--auto_resume, or load_checkpoint()), or save this one to a new save_dir")
    raise CheckpointExistsError(
        f"{held}, newer than {resume_from} (step {start}) where this run starts; its saves would collide with "
        "the newer checkpoints. Continue from the newest (--auto_resume), or give the rewound run a new save_dir")
