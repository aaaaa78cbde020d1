"""What a training loop counts, and which checkpoint (if any) it owes after a step: shared by train.py and
main_experiment.py."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TrainState:
    """The run's counters, saved in every checkpoint as the plain dict `counters` (the format earlier
    checkpoints have). batch_size and world_size record the run that saved; a resume keeps its own."""

    epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0  # samples consumed over all epochs, all ranks
    best_metric: float | None = None
    batch_size: int = 1
    world_size: int = 1

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: asdict would deepcopy

    def resume_from(self, saved: dict) -> tuple[int, int]:
        """Take the progress of a saved `counters` dict; returns the saving run's (batch_size, world_size)."""
        self.epoch, self.global_step = saved["epoch"], saved["global_step"]
        self.samples_seen, self.best_metric = saved["samples_seen"], saved["best_metric"]
        return saved["batch_size"], saved["world_size"]


def checkpoint_after_step(manager, step: int, *, epoch_done: bool, run_done: bool,
                          epoch_end_saved: bool) -> str | None:
    """The kind of checkpoint to save after optimizer step `step`, or None. Call it after every step, on every
    rank: manager.should_save is where the ranks agree on a preemption signal.

    "preemption" when a signal arrived and this is not the run's last step (there the final save serves; the
    caller then exits with PREEMPTED_EXIT_CODE); "step" when a periodic save is due, except on the run's last
    step (the final save) and at an epoch's end when the caller saves an epoch checkpoint there
    (`epoch_end_saved`)."""
    due = manager.should_save(step)
    if manager.preempted and not run_done:
        return "preemption"
    if not due or run_done or (epoch_done and epoch_end_saved):
        return None
    return "step"
