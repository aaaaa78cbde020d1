"""Shape checks for numbers read from files the engine does not trust: metadata.json, DCP's index, a pickle."""
from __future__ import annotations

from typing import Any


def is_count(value: Any) -> bool:
    """A plain int >= 0: not a bool (an int subclass), not a float such as 1e400, nothing else posing as one."""
    return type(value) is int and value >= 0


def is_dims(value: Any, kinds: type | tuple[type, ...] = (tuple, list)) -> bool:
    """A sequence of `kinds` whose every element is a count (a size, an offset or strides)."""
    return isinstance(value, kinds) and all(map(is_count, value))
