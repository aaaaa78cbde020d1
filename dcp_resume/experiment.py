"""ExperimentCheckpointer: the high-level interface for experiment scripts (README.md, "Using the engine")."""
from __future__ import annotations

from typing import Any

from .manager import CheckpointManager
from .options import as_dict


class ExperimentCheckpointer:
    """`config` is a dict, dataclass or namespace with `save_dir` and optionally `save_interval`,
    `keep_last_n` and `verbose`. All of it is recorded in each checkpoint's config.json."""

    def __init__(self, config: Any):
        cfg = as_dict(config)
        if not cfg.get("save_dir"):
            raise ValueError("ExperimentCheckpointer(config): config has no save_dir; set config.save_dir to the "
                             "directory that holds the checkpoints")
        self.manager = CheckpointManager(cfg["save_dir"], save_interval=cfg.get("save_interval", 100),
                                         keep_last_n=cfg.get("keep_last_n", 3), verbose=cfg.get("verbose", True),
                                         config=cfg)

    def save_training_state(self, model, optimizer, scheduler, epoch: int, step: int,
                            metrics: dict | None = None, best_metric: Any = None, *, is_best: bool = False,
                            kind: str = "step", extra_state: dict | None = None) -> str | None:
        """Save model, optimizer, scheduler (either may be None) and the progress counters. Returns the
        checkpoint's path, or None when a periodic save was skipped for lack of disk space."""
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                 "progress": {"epoch": int(epoch), "step": int(step), "best_metric": best_metric,
                              "metrics": dict(metrics or {})}, **(extra_state or {})}
        state = {k: v for k, v in state.items() if v is not None}
        return self.manager.save_checkpoint(state, step=step, epoch=epoch, is_best=is_best, kind=kind,
                                            metrics=metrics, best_metric=best_metric)

    def resume_training(self, model, optimizer, scheduler, checkpoint_path: str | None = None,
                        extra_state: dict | None = None) -> tuple[int, int, Any, dict]:
        """Restore from `checkpoint_path` or the latest complete checkpoint, in place; returns
        `(epoch, step, best_metric, metrics)`, or `(0, 0, None, {})` when there is nothing to resume.
        Live objects in `extra_state` (e.g. a data sampler) are restored in place too."""
        path = checkpoint_path or self.manager.find_latest_checkpoint()
        if path is None:
            return 0, 0, None, {}
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": None,
                 **(extra_state or {})}
        loaded = self.manager.load_checkpoint(path, state={k: v for k, v in state.items()
                                                           if v is not None or k == "progress"})
        p = loaded["progress"]
        return int(p["epoch"]), int(p["step"]), p.get("best_metric"), dict(p.get("metrics", {}))

    def close(self) -> None:
        self.manager.close()
