"""What a CheckpointManager is configured with: one dataclass, each field documented and validated once.

`CheckpointManager(save_dir, save_interval=..., keep_last_n=..., ...)` (the established keywords) builds one;
`CheckpointManager(save_dir, options=CheckpointOptions(...))` passes one made elsewhere (a config file).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .preemption import DEFAULT_SIGNALS

LOW_DISK_POLICIES = ("skip", "fail")


@dataclasses.dataclass
class CheckpointOptions:
    save_interval: int = 100
    """Steps between periodic saves (`should_save`); 0 disables them (epoch, final and preemption saves remain)."""
    keep_last_n: int | None = 3
    """Complete checkpoints kept after each commit, newest first; None keeps all. The newest, the best (with
    keep_best) and the one just committed are never removed."""
    enable_preemption_handling: bool = True
    """SIGTERM/SIGUSR1/SIGINT (or `preemption_signals`) set a flag that `should_save` agrees on across ranks."""
    verbose: bool = True
    """INFO log lines for saves, loads and removals; warnings and errors are always logged."""
    config: Any = None
    """The run's configuration (dict, dataclass or namespace), written to each checkpoint's config.json."""
    keep_best: bool = True
    """Retention never removes the newest checkpoint saved with is_best=True."""
    collective_timeout_s: float = 600.0
    """How long any collective of a save waits for the other ranks before the save fails naming the step."""
    preemption_signals: tuple = DEFAULT_SIGNALS
    """The signals that request a preemption checkpoint."""
    async_save: bool = False
    """save_checkpoint returns once the state is staged; writing and the commit run on a background thread."""
    on_commit: Callable[[str], None] | None = None
    """Called on rank 0 with the path of each committed checkpoint (async: when the commit lands)."""
    low_disk_policy: str = "skip"
    """A periodic save that would not fit: 'skip' it with a warning, or 'fail' (CheckpointSaveError)."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for a URL save_dir (endpoint, credentials); never written to any checkpoint."""
    lock_wait_s: float = 30.0
    """How long a live holder of the save_dir lock (e.g. `dcp-resume prune`) is waited for."""
    lock_lease_s: float = 60.0
    """The save_dir lock's lease: the holder renews it every lock_lease_s/4, and a job on another host takes it
    over once it goes unrenewed this long (+2 s; savedir_lock.py). Keep it well below collective_timeout_s: the
    other ranks wait while rank 0 watches a lease."""
    incremental: bool = True
    """Tensors whose bytes match an earlier checkpoint (frozen weights, buffers) are linked from it, not staged nor
    written again (incremental.py; from the checkpoint before the newest, so the newest two share no file:
    link_source.py). False: every save writes everything."""

    def __post_init__(self) -> None:
        if self.keep_last_n is not None and (not _is_int(self.keep_last_n) or self.keep_last_n < 1):
            raise ValueError(f"keep_last_n={self.keep_last_n!r} must be an integer >= 1 (or None to keep every "
                             "checkpoint); a policy that keeps nothing would delete the checkpoint to resume from")
        if self.save_interval is not None and (not _is_int(self.save_interval) or self.save_interval < 0):
            raise ValueError(f"save_interval={self.save_interval!r} must be an integer >= 0 (0 disables periodic "
                             "saves)")
        if self.low_disk_policy not in LOW_DISK_POLICIES:
            raise ValueError(f"low_disk_policy={self.low_disk_policy!r} must be one of {', '.join(LOW_DISK_POLICIES)}")
        for name in ("collective_timeout_s", "lock_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number of seconds >= 0")
        lease = self.lock_lease_s
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < float("inf"):
            raise ValueError(f"lock_lease_s={lease!r} must be a number of seconds > 0")
        self.config = as_dict(self.config)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_dict(config: Any) -> dict[str, Any]:
    """A dict, dataclass or namespace, as a plain dict (what config.json holds)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "__dict__"):
        return dict(vars(config))
    raise TypeError(f"config must be a dict, dataclass or namespace, got {type(config).__name__}")
