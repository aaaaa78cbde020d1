"""Save-on-signal: handlers only set a flag; ranks agree on it at step boundaries.

SLURM sends SIGTERM (or SIGUSR1 with `--signal=B:USR1@120`) before it kills a job; people press
Ctrl+C. Acting inside a handler would save from an arbitrary instant; instead the flag is read at the
next step boundary, all-reduced so every rank sees it at the same step, and the caller commits a
`preemption` checkpoint and exits with PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from .logs import logger

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: launchers and SLURM scripts requeue on it
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    """Installs flag-setting handlers (main thread only), chains to handlers that were there, and puts
    them back on `restore()`. A second SIGINT exits at once (status 130)."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.installed = False  # install() ran (once; outside the main thread it only warned)
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        self.installed = True
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption handling not installed: the CheckpointManager was first used outside "
                           "the main thread, where Python cannot set signal handlers")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            os._exit(130)  # second Ctrl+C: the user means it
        if self.received is None:
            self.received = signum
        prev = self._previous.get(signum)
        # Chain to an application's own handler, not to Python's defaults (which would raise/exit now).
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)


def agree(local: bool, group) -> bool:
    """True on every rank when any rank has the flag (a one-element MAX all-reduce on the gloo group)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def exit_preempted() -> None:
    """Exit with PREEMPTED_EXIT_CODE now, after flushing logs and streams. Skips interpreter teardown,
    which resets signal handlers to their defaults: torchrun SIGTERMs the remaining workers as soon as
    one exits, and that SIGTERM would otherwise turn an orderly 143 into a kill (-15)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_CODE)
