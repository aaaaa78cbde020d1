"""What "the resume was exact" compares: the final checkpoint's state, bit for bit."""
from __future__ import annotations

import torch

from dcp_resume import CheckpointManager

COMPARED = ("model", "optimizer", "scheduler", "sampler", "counters")  # the state entries an exact resume restores


def final_state(save_dir: str) -> tuple[dict, dict]:
    """Everything in the latest complete checkpoint, read back from its state/, and its metadata."""
    mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
    return mgr.load_checkpoint(), mgr.loaded_metadata


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two loaded states differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}" if path else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]
