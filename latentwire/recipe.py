"""The training recipe train.py and main_experiment.py share: the tiny model size, the LR schedule, seeding."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

# --tiny: a model that trains in seconds on CPU (the tests' and the demo's size)
TINY = dict(d_model=32, n_layers=1, num_latents=4, d_z=32, max_context_bytes=96, max_answer_tokens=8)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
