"""Per-rank RNG state (python, numpy, torch CPU, CUDA) as tensors and plain values.

Tensors rather than pickled tuples, so the state stays readable by plain DCP and needs no unpickling
of arbitrary objects. Streams differ per rank, so the engine saves RNGState per rank (dcp_resume/per_rank.py)
and gives each rank its own back. Checkpoints written before that kept each rank under its own key
(`rank<N>`); they still load.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


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
    """A stateful view of this process's RNG streams, to put in a checkpoint's state dict.

    `restored` tells whether load_state_dict restored them. It stays False after a world-size change (streams
    cannot be resharded; the engine leaves this object as constructed and says so): the caller reseeds.
    """

    checkpoint_per_rank = True  # saved by every rank, even at world size 1 (dcp_resume/per_rank.py)
    fresh_on_resize = True  # at another world size: keep this process's own seeding (restored stays False)

    def __init__(self, rank: int = 0):
        self.rank = rank  # only to read checkpoints that keyed each rank's streams as "rank<N>"
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state if "torch" in state else state.get(f"rank{self.rank}")
        self.restored = mine is not None
        if mine is not None:
            restore_rng(mine)
