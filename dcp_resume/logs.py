"""Rank-0-only logging through the `dcp_resume` logger (warnings and errors pass on every rank)."""
from __future__ import annotations

import logging
import sys

from .distributed import rank

logger = logging.getLogger("dcp_resume")


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


def configure(verbose: bool) -> None:
    """INFO (saves, loads, removals) when verbose, else warnings only. Adds a stdout handler only when
    the application configured none, so an app's own logging setup wins."""
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[dcp_resume] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
