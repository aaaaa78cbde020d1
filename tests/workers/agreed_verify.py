"""Verification spread over the ranks of a resume (see test_resume_at_scale.py), under torchrun:

    agreed_verify.py OUT_DIR

Saves an FSDP2 model + AdamW twice (step_1, then step_2 after more training; full writes, not incremental),
then resumes with fresh objects: once clean, then once per shard and per side file of step_2 with one byte of
that file flipped (rank 0 flips it between barriers, and flips it back after), then once with a key only the last
rank's state holds. Each rank writes OUT_DIR/rank<r>.json: per case, the checkpoint it loaded, the engine's
load_stats and /proc/self/io's rchar growth over the load (for the last case, the error it raised);
rank 0 also saves the full restored state per case, and the reference states of step_1 and step_2.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import full_state, init_dist  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402

out = sys.argv[1]
rank = init_dist()
world = dist.get_world_size()
save_dir = os.path.join(out, "run")


class Stack(nn.Module):
    """~0.8 MB of parameters (2.4 MB with AdamW's state): the shards, not the side files, hold the bytes."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(224, 224) for _ in range(4)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def training(seed):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Stack()
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, n):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(n):
        model(torch.randn(8, 224, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


model, opt = training(0)
with CheckpointManager(save_dir, keep_last_n=None, verbose=False, incremental=False) as mgr:
    for n in (1, 2):
        step(model, opt, 2)
        mgr.save_checkpoint({"model": model, "optimizer": opt}, step=n)
        ref = full_state(model, opt)
        if rank == 0:
            torch.save(ref, os.path.join(out, f"ref_step_{n}.pt"))

# a shard's flipped byte is found by the rank reading it, mid-load; a side file's by the rank hashing it, before
cases = ["clean"] + [f"state/__{r}_0.distcp" for r in range(world)] + ["config.json", "training_stats.json"]
report = {}
for case in cases:
    shard = os.path.join(save_dir, "step_2", case)
    if case != "clean" and rank == 0:
        flip(shard)
    dist.barrier()
    model, opt = training(7)  # different weights: only a load makes them equal to a checkpoint
    mgr = CheckpointManager(save_dir, verbose=False)
    before = rchar()
    mgr.load_checkpoint(state={"model": model, "optimizer": opt})
    report[case] = {"loaded": mgr.loaded_path, "rchar": rchar() - before, "stats": mgr.load_stats.as_dict()}
    mgr.close()
    got = full_state(model, opt)
    if rank == 0:
        torch.save(got, os.path.join(out, f"restored_{os.path.basename(case)}.pt"))
        if case != "clean":
            flip(shard)  # back as it was
    dist.barrier()
# the last rank's live objects do not fit the checkpoint (a key it never saved): every rank gets that rank's error
model, opt = training(7)
state = {"model": model, "optimizer": opt, **({"ema": torch.zeros(3)} if rank == world - 1 else {})}
mgr = CheckpointManager(save_dir, verbose=False)
try:
    mgr.load_checkpoint(state=state)
    report["mismatch"] = {"error": None}
except Exception as e:  # noqa: BLE001 - the report says which
    report["mismatch"] = {"error": type(e).__name__, "message": str(e)}
mgr.close()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as roundtrip.py: no interpreter teardown after destroy_process_group
