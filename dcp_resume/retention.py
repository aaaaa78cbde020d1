"""Which checkpoint directories may go: the keep_last_n policy, interrupted saves, and damaged checkpoints that a
newer complete one has replaced."""
from __future__ import annotations

from .layout import CheckpointInfo


def plan_removals(infos: list[CheckpointInfo], keep_last_n: int | None,
                  keep_best: bool = True, protect: str | None = None) -> list[CheckpointInfo]:
    """Directories to delete: complete ones beyond the newest keep_last_n (never the newest, never the
    newest marked is_best when keep_best, never `protect`: the checkpoint just committed, which an older run's
    higher step numbers must not push out), every interrupted save (no metadata.json), and each damaged one
    (committed, not complete) below the newest complete checkpoint: a damaged checkpoint is evidence, kept
    until a newer complete one exists (one of unknown step is kept). keep_last_n=None: only interrupted saves
    go. No save of ours is writing while this runs: at most one is in flight, and retention runs after its
    commit or before the next one starts."""
    complete = sorted((i for i in infos if i.complete), key=lambda i: i.order, reverse=True)
    doomed = [i for i in infos if not i.committed and i.path != protect]
    if keep_last_n is None:
        return doomed
    if complete:
        newest = complete[0].step
        doomed += [i for i in infos if i.committed and not i.complete and 0 <= i.position < newest]
        keep = {i.path for i in complete[:keep_last_n]} | {protect}
        best = next((i for i in complete if i.meta.get("is_best")), None)
        if keep_best and best is not None:
            keep.add(best.path)
        doomed += [i for i in complete if i.path not in keep]
    return doomed
