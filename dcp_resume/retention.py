"""Which checkpoint directories may go: the keep_last_n policy and leftover incomplete directories."""
from __future__ import annotations

from .layout import CheckpointInfo


def plan_removals(infos: list[CheckpointInfo], keep_last_n: int | None,
                  keep_best: bool = True, protect: str | None = None) -> list[CheckpointInfo]:
    """Directories to delete: complete ones beyond the newest keep_last_n (never the newest, never the
    newest marked is_best when keep_best, never `protect`: the checkpoint just committed, which an older run's
    higher step numbers must not push out), and every incomplete one. No save of ours is writing while this
    runs: at most one is in flight, and retention runs after its commit or before the next one starts."""
    complete = sorted((i for i in infos if i.complete), key=lambda i: i.order, reverse=True)
    doomed = [i for i in infos if not i.complete and i.path != protect]
    if keep_last_n is not None and complete:
        keep = {i.path for i in complete[:keep_last_n]} | {protect}
        best = next((i for i in complete if i.meta.get("is_best")), None)
        if keep_best and best is not None:
            keep.add(best.path)
        doomed += [i for i in complete if i.path not in keep]
    return doomed
