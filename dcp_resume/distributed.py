"""The few collectives the commit protocol needs, on a dedicated gloo group (CPU objects only), and how a
failed collective is told apart and named (another rank died or hung)."""
from __future__ import annotations

import contextlib
import datetime as _dt
from typing import Any

import torch.distributed as dist

from .errors import RankFailureError


# How a collective reports a rank that died or hung: gloo's timeout and closed connections, NCCL's watchdog.
_PEER_FAILURE_TEXT = ("timed out waiting", "application timeout caused pair closure", "connection closed by peer",
                      "connection reset by peer", "watchdog caught collective operation timeout",
                      "nccl communicator was aborted")


def causes(e: BaseException) -> list[BaseException]:
    """e, what it was raised from, and every rank's error inside a DCP CheckpointException."""
    out, todo = [], [e]
    while todo and len(out) < 64:
        exc = todo.pop(0)
        if exc is None or any(exc is seen for seen in out):
            continue
        out.append(exc)
        todo += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [exc for exc in out if isinstance(exc, BaseException)]


def first_line(e: BaseException) -> str:
    """What went wrong, in one line: for a DCP CheckpointException, the first failing rank's own error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        where, failure = min(failures.items(), key=lambda item: item[0])
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"rank {where}: {first_line(inner)}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def peer_failure(e: BaseException) -> bool:
    """Whether e says another rank died or hung (a collective timed out or lost its connection)."""
    dist_error = getattr(dist, "DistError", ())
    return any(isinstance(exc, dist_error) or any(t in str(exc).lower() for t in _PEER_FAILURE_TEXT)
               for exc in causes(e))


@contextlib.contextmanager
def rank_failures_named(what: str, timeout_s: float):
    """Around a training step: a collective that fails because another rank died or hung (gloo's timeout
    is the process group's `timeout`) becomes one RankFailureError naming `what`, e.g. 'step 12'."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, RankFailureError) or not peer_failure(e):
            raise
        detail = first_line(e)
        raise RankFailureError(
            f"{what} failed on rank {rank()}: {detail}. Another rank has died or hung (collectives wait at most "
            f"collective_timeout_s={timeout_s:g}s); the last committed checkpoint stays the latest: resume from "
            "it") from e


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

    def run_on_rank0(self, fn) -> Any:
        """fn() on rank 0; every rank returns its result or raises its exception (as DCP's _DistWrapper
        shares a coordinator's result), so no rank hangs or goes on alone when rank 0 fails."""
        result = error = None
        if rank() == 0:
            try:
                result = fn()
            except Exception as e:  # shared below, re-raised on every rank
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

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
