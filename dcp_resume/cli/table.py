"""Aligned plain-text columns and human-readable sizes and times for the CLI's output."""
from __future__ import annotations

import datetime as _dt


def human_bytes(n: int | None) -> str:
    """Decimal units, like the engine's own log lines (`Saved checkpoint: ... (4.9 MB, ...)`)."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def utc_time(ts) -> str:
    """metadata.json's ISO 8601 timestamp as `YYYY-MM-DD HH:MM:SS` (UTC); '-' when absent or unparsable."""
    try:
        when = _dt.datetime.fromisoformat(str(ts))
    except ValueError:
        return "-"
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def render(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Lines of columns padded to their widest cell; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines
