"""Detect accelerate-prepared data loaders whose shuffle order a checkpoint cannot bring back.

Why: `accelerator.prepare(DataLoader(..., shuffle=True))` keeps torch's plain `RandomSampler`. Under
several processes accelerate gives it a `torch.Generator` seeded once, at prepare time, from the global
torch RNG, and broadcasts rank 0's generator state at the start of every epoch (`rng_types=["generator"]`);
each epoch's permutation then advances that generator. In one process the sampler has no generator and
draws its seed from the global RNG when the epoch starts. Either way the state that decides the order of
the current epoch is in no `state_dict()`: not the model's, the optimizer's, the loader's (its state is
empty unless torchdata backs it) nor the RNG streams saved mid-epoch (they have moved on since the epoch
began). After a mid-epoch resume the rebuilt generator starts over (epoch 0's order again), so
`skip_first_batches` skips the right number of batches of the wrong permutation: past epoch 0, samples
repeat and others are never seen.

`DataLoaderConfiguration(use_seedable_sampler=True)` swaps in `SeedableRandomSampler`, whose order is
a pure function of (seed, epoch), the seed being `data_seed` or else torch's initial seed (`set_seed`):
`loader.set_epoch(epoch)` plus `accelerator.skip_first_batches` resume it exactly.
`use_stateful_dataloader=True` (torchdata) puts the position in `loader.state_dict()`, which the
checkpoint must then hold; it replays the sampler from the start of the epoch on a fresh generator, so
it too needs the seedable sampler past epoch 0.
"""
from __future__ import annotations

import sys
from typing import Any

_FIX = ("set Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)) and, on resume, "
        "call loader.set_epoch(epoch) then accelerator.skip_first_batches(loader, step_in_epoch) (or also set "
        "use_stateful_dataloader=True and put the loader in the checkpoint state instead of skipping)")


def _inner_sampler(node: Any) -> Any:
    """The sampler that picks indices, below BatchSampler / BatchSamplerShard / SkipBatchSampler wrappers."""
    for _ in range(8):
        inner = getattr(node, "sampler", None)
        if inner is None:
            inner = getattr(node, "batch_sampler", None)
        if inner is None:
            return node
        node = inner
    return node


def _problem(loader: Any, dl: Any) -> str | None:
    from torch.utils.data import RandomSampler

    loader = getattr(loader, "_loader", loader)  # XLA's MpDeviceLoaderWrapper
    if not isinstance(loader, (dl.DataLoaderShard, dl.DataLoaderDispatcher)):
        return None  # not prepared by accelerate (skip_first_batches of a prepared loader stays one)
    base = loader.base_dataloader
    sampler = _inner_sampler(base.batch_sampler if base.batch_sampler is not None else base.sampler)
    if not isinstance(sampler, RandomSampler) or isinstance(sampler, dl.SeedableRandomSampler):
        return None  # sequential, custom or seedable: the order is a function of (seed, epoch)
    source = ("a generator accelerate seeded once at prepare time and advances every epoch"
              if getattr(loader, "synchronized_generator", None) is not None
              else "a seed drawn from the global RNG as each epoch starts")
    stateful = (" (use_stateful_dataloader alone does not cover it: it replays the epoch from a fresh generator)"
                if getattr(loader, "use_stateful_dataloader", False) else "")
    return (f"accelerate-prepared {type(loader).__name__} shuffles with a plain RandomSampler whose order comes "
            f"from {source}, state no checkpoint holds{stateful}, so a mid-epoch resume repeats and skips "
            f"samples: {_FIX}.")


def unresumable_loader_problem(loader: Any = None) -> str | None:
    """One sentence naming what to set when `loader` (default: the prepared loaders accelerate is
    iterating now, from GradientState) shuffles in an order no checkpoint restores; None when it is fine,
    not an accelerate loader, or accelerate is not installed or not in use."""
    if "accelerate" not in sys.modules:  # never imported: not in use (and maybe not installed)
        return None
    try:
        from accelerate import data_loader as dl
        from accelerate.state import GradientState
    except ImportError:
        return None
    if loader is not None:
        candidates = [loader]
    else:
        shared = GradientState._shared_state  # read, never create, the singleton
        refs = shared.get("_dataloader_references_ref") or []
        candidates = [r() for r in refs if r is not None]
    for candidate in candidates:
        if candidate is not None and (msg := _problem(candidate, dl)):
            return msg
    return None
