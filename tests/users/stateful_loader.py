"""A user's own training script: torchdata's StatefulDataLoader with 2 workers and random augmentation, a DDP
model, dcp-resume for checkpoints. Run under torchrun (or plain python for one rank).

  --sampler distributed   DistributedSampler(shuffle=True): the loader's position is per rank
  --sampler resumable     dcp_resume.ResumableSampler as batch_sampler: a global position that reshards
  --stop_after N          save a checkpoint after global step N and exit (as if preempted there)
  --resume                load the latest checkpoint, then train to the end

Writes '<epoch> <step> <rank> <ids>' lines to --trace.<rank> and prints 'FINAL <hash of the weights>'.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import xxhash
from torch.utils.data import Dataset, DistributedSampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from dcp_resume import CheckpointManager, CheckpointMismatchError, ResumableSampler, RNGState, exact_ddp

N, BATCH = 40, 4


class Noisy(Dataset):
    """Sample i: its id and features plus random augmentation from a generator seeded by the worker's seed
    (which derives from the loader's per-rank base seed). torchdata restarts a worker's global RNG from its
    seed on load, so augmentation that must resume exactly keeps its generator in the dataset's own state,
    which StatefulDataLoader saves per worker."""

    def __init__(self):
        self.gen = None

    def _gen(self):
        if self.gen is None:
            info = get_worker_info()
            self.gen = torch.Generator().manual_seed(info.seed if info else 0)
        return self.gen

    def __len__(self):
        return N

    def __getitem__(self, i):
        return i, torch.full((4,), float(i) / N) + 0.01 * torch.rand(4, generator=self._gen())

    def state_dict(self):
        return {"gen": self._gen().get_state()}

    def load_state_dict(self, state):
        self._gen().set_state(state["gen"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--save_dir", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--sampler", choices=["distributed", "resumable"], default="distributed")
    p.add_argument("--stop_after", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    if world > 1:
        model = exact_ddp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)  # per-rank seeds: each rank's loader gets its own base seed
    if a.sampler == "distributed":
        sampler = DistributedSampler(Noisy(), num_replicas=world, rank=rank, shuffle=True, seed=5)
        loader = StatefulDataLoader(Noisy(), batch_size=BATCH, sampler=sampler, num_workers=2)
    else:
        sampler = ResumableSampler(N, BATCH, rank, world, seed=5)
        loader = StatefulDataLoader(Noisy(), batch_sampler=sampler, num_workers=2)
    progress = {"epoch": 0, "global_step": 0}
    # RNGState: the main process's RNG draws each epoch's worker base seed
    state = {"model": model, "optimizer": opt, "loader": loader, "progress": progress, "rng": RNGState()}
    mgr = CheckpointManager(a.save_dir, save_interval=0, keep_last_n=None, enable_preemption_handling=False)
    if a.resume:
        try:
            loaded = mgr.load_checkpoint(state=state)
        except CheckpointMismatchError as e:
            print(f"REFUSED: {e}", flush=True)
            return 3
        progress.update(loaded["progress"])

    trace = open(f"{a.trace}.{rank}", "a")
    for epoch in range(progress["epoch"], a.epochs):
        progress["epoch"] = epoch
        sampler.set_epoch(epoch)  # a no-op for the epoch a resumed ResumableSampler is in
        for ids, x in loader:
            loss = (model(x).squeeze(1) - ids.float() / N).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            progress["global_step"] += 1
            trace.write(f"{epoch} {progress['global_step']} {rank} {','.join(map(str, ids.tolist()))}\n")
            trace.flush()
            if progress["global_step"] == a.stop_after:
                mgr.save_checkpoint(state, step=progress["global_step"], epoch=epoch)
                mgr.close()
                return 0
        if a.sampler == "resumable":
            sampler.set_epoch(epoch + 1)  # the epoch is done: the next one starts at its beginning
    weights = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
    sys.stdout.write(f"FINAL {xxhash.xxh3_64(weights.numpy().tobytes()).hexdigest()}\n")  # one write: no interleaving
    sys.stdout.flush()
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
