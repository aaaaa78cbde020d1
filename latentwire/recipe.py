"""The training recipe train.py and main_experiment.py share: the tiny model size, the LR schedule, seeding."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from .data import LLAMA_VOCAB, QWEN_VOCAB
from .model import LMConfig

# --tiny: a model that trains in seconds on CPU (the tests' and the demo's size)
TINY = dict(d_model=32, n_layers=1, num_latents=4, d_z=32, max_context_bytes=96, max_answer_tokens=8)
# benchmarks/incremental_save.py: frozen LMs ~28x the trainable parameters, as in the real system (two 7-8B
# LMs around ~0.1-0.3B of encoder and adapters)
BENCHMARK_LMS = dict(llama=LMConfig(hidden=256, n_layers=6, vocab=LLAMA_VOCAB),
                     qwen=LMConfig(hidden=256, n_layers=6, vocab=QWEN_VOCAB))


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's RNG streams (dropout etc.): distinct per rank and reproducible. After a resume
    whose RNG state has no owner (another world size), the step is mixed in so the streams do not replay
    those of step 0 (7919: a prime above any world size used here, so the (rank, step) pairs of one seed get
    distinct seeds)."""
    return seed * 1000 + rank + 7919 * step


def align_lr_with_schedule(optimizer, scheduler) -> None:
    """When only one of optimizer and LR schedule was restored, make the optimizer step at the schedule's LR:
    a fresh optimizer at the restored schedule's, a restored one (which carries the saved LR) at the fresh
    schedule's."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
