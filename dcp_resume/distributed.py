"""The few collectives the commit protocol needs, on a dedicated gloo group (CPU objects only)."""
from __future__ import annotations

import datetime as _dt
from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class CommitGroup:
    """A gloo group created on first use (a collective: every rank creates it in the same call)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._group = None

    @property
    def group(self):
        if self._group is None and is_distributed():
            self._group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=self.timeout_s))
        return self._group

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        if not is_distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if not is_distributed():
            return [obj]
        out = [None] * world_size() if rank() == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not is_distributed():
            return [obj]
        out = [None] * world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self._group is not None and is_distributed():
            dist.destroy_process_group(self._group)
        self._group = None
