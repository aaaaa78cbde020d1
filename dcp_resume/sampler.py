"""A distributed batch sampler whose position survives a restart with another batch size or world size."""
from __future__ import annotations

from typing import Iterator

import torch

_STATE_KEYS = ("epoch", "consumed", "seed", "num_samples")


class ResumableSampler:
    """Yields this rank's batches of dataset indices; resumable at any step.

    Order: each epoch is a permutation of range(num_samples) that depends only on (seed, epoch)
    (a local torch.Generator; the global RNG is never read or advanced), or the identity when
    shuffle=False. Every rank computes the same permutation.

    Position: `consumed` counts the samples of the current epoch handed out across ALL ranks. A step
    takes the next global batch, order[consumed : consumed + batch_size * world_size], and rank r
    gets the r-th contiguous share of it: order[consumed + r*batch_size : consumed + (r+1)*batch_size].
    Because the state is a global position, not a per-rank one, it can be resumed with any
    batch_size and world_size: the rest of the epoch is then handed out exactly once.

    `consumed` advances when a batch is yielded, so state_dict() taken after a training step
    includes the samples that step used. A loader with workers pulls batches ahead of training, so
    with workers use torchdata's StatefulDataLoader(dataset, batch_sampler=sampler, num_workers=N) and
    put the loader, not the sampler, in the checkpoint state: the loader records the sampler's position
    at the last batch it handed out. dcp-resume saves a loader per rank; after a world-size change it
    gives this sampler rank 0's saved (global) position, so the epoch still goes on exactly once.

    Last global batch (fewer than batch_size * world_size samples left), the rule that keeps every
    rank on the same number of steps (unequal step counts deadlock DDP collectives):
      * drop_last=True: it is skipped; every batch is full.
      * drop_last=False: the R remaining samples are split into world_size contiguous shares whose
        sizes differ by at most one (the first R % world_size ranks get the extra sample). Only if
        R < world_size would some ranks get nothing; each of those gets a single padding sample
        instead, wrapping around to the start of the epoch's order (as DistributedSampler pads).
        `padding_count` says how many padding samples were handed out this epoch (across ranks).
        With R >= world_size there is no padding and every sample is seen exactly once.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if num_samples < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"num_samples ({num_samples}), batch_size ({batch_size}) and "
                             f"world_size ({world_size}) must all be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.epoch = 0
        self.consumed = 0
        self.padding_count = 0
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def order(self, epoch: int | None = None) -> list[int]:
        """The epoch's full permutation (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        self._order_cache = (epoch, order)
        return order

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a no-op for the current epoch (so a resumed run that calls
        set_epoch(resumed_epoch) keeps its position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.consumed, self.padding_count = int(epoch), 0, 0

    def __len__(self) -> int:
        """Batches left in this epoch; the same on every rank."""
        left = self.num_samples - self.consumed
        g = self.global_batch_size
        return left // g if self.drop_last else -(-left // g)

    def _share(self, start: int, size: int) -> tuple[int, int]:
        """This rank's [begin, end) within a global batch of `size` samples starting at `start`."""
        base, extra = divmod(size, self.world_size)
        begin = start + self.rank * base + min(self.rank, extra)
        return begin, begin + base + (1 if self.rank < extra else 0)

    def _padding(self, size: int) -> list[int]:
        """The padding sample of a rank with an empty share of a final batch of `size` < world_size."""
        return [self.order()[(self.rank - size) % self.num_samples]]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        epoch = self.epoch
        # Re-checked every step, so set_epoch()/load_state_dict() during a pass takes effect.
        while self.epoch == epoch and len(self) > 0:
            size = min(self.global_batch_size, self.num_samples - self.consumed)
            begin, end = self._share(self.consumed, size)
            batch = order[begin:end] if end > begin else self._padding(size)
            self.consumed += size
            self.padding_count += max(0, self.world_size - size)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the saving run may have used another batch/world size."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing {missing}; expected keys {list(_STATE_KEYS)}")
        for key in ("num_samples", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state mismatch: saved {key}={int(state[key])}, "
                                 f"this sampler has {key}={getattr(self, key)}")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"sampler state: consumed={consumed} is outside [0, {self.num_samples}]")
        self.epoch, self.consumed, self.padding_count = int(state["epoch"]), consumed, 0
