"""Per-rank RNG state (python, numpy, torch CPU, CUDA) as tensors and plain values.

Tensors rather than pickled tuples, so the state stays readable by plain DCP and needs no unpickling
of arbitrary objects. Each rank saves under its own key (`rank<N>`): DCP deduplicates identical keys
across ranks, and RNG streams differ per rank.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rank_key(rank: int) -> str:
    return f"rank{rank}"


def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), int(nps["pos"]),
                         int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if cuda.shape[0] != torch.cuda.device_count():
            raise ValueError(f"checkpoint holds CUDA RNG states for {cuda.shape[0]} devices, this process sees "
                             f"{torch.cuda.device_count()}; set CUDA_VISIBLE_DEVICES to match or reseed")
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])


class RNGState:
    """A stateful view of this rank's RNG streams, to put in a checkpoint's state dict.

    Saves `{"rank<N>": ...}` for this rank only; on load restores this rank's streams if the checkpoint
    has them. `restored` tells whether it did (False after a world-size change: the caller reseeds).
    """

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return {rank_key(self.rank): capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get(rank_key(self.rank))
        self.restored = mine is not None
        if mine is not None:
            restore_rng(mine)
