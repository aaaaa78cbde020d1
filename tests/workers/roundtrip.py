"""Round trips and reshards under torchrun (see test_distributed.py):

    roundtrip.py OUT_DIR [--save] [--load NAME ...]

--save  writes DDP and FSDP2 checkpoints at this world size (OUT_DIR/<kind>_ws<N>), with reference
        tensors and a record of which ranks wrote metadata.json, then reloads both at this world size.
--load  loads checkpoints written at another world size (e.g. fsdp2_ws2) and dumps what was restored.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import full_state, fsdp2, init_dist, make_training, train_steps  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402
from dcp_resume.storage import LocalStorage  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--save", action="store_true")
parser.add_argument("--load", nargs="*", default=[])
args = parser.parse_args()
out = args.out
rank = init_dist()
world = dist.get_world_size() if dist.is_initialized() else 1
wrappers = {"ddp": torch.nn.parallel.DistributedDataParallel, "fsdp2": fsdp2}

# Spy (not a mock: the real function runs) on who writes metadata.json.
_commit = LocalStorage.commit_json_atomically


def spy(self, path, obj):
    with open(os.path.join(out, f"commit_rank{rank}.log"), "a") as f:
        f.write(path + "\n")
    _commit(self, path, obj)


LocalStorage.commit_json_atomically = spy


def restored(kind, path):
    model, opt, sched = make_training(seed=99, wrap=wrappers[kind])
    mgr = CheckpointManager(os.path.dirname(path), verbose=False)
    got = mgr.load_checkpoint(path, state={"model": model, "optimizer": opt, "scheduler": sched, "step": 0})
    mgr.close()
    return {**full_state(model, opt), "sched": sched.state_dict(), "step": got["step"]}


if args.save:
    for kind in ("ddp", "fsdp2"):
        model, opt, sched = make_training(seed=0, wrap=wrappers[kind])
        train_steps(model, opt, sched, 3)
        with CheckpointManager(os.path.join(out, f"{kind}_ws{world}"), keep_last_n=2) as mgr:
            path = mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched, "step": 3},
                                       step=3, epoch=0)
        ref = {**full_state(model, opt), "sched": sched.state_dict(), "step": 3}
        if rank == 0:
            torch.save(ref, os.path.join(out, f"{kind}_ws{world}_ref.pt"))
        back = restored(kind, path)
        if rank == 0:
            torch.save(back, os.path.join(out, f"{kind}_ws{world}_same.pt"))
for src in args.load:
    back = restored(src.split("_")[0], os.path.join(out, src, "step_3"))
    if rank == 0:
        torch.save(back, os.path.join(out, f"{src}_at_ws{world}.pt"))
if dist.is_initialized():
    dist.destroy_process_group()
# Everything is written and checked by now. Under load, interpreter teardown after destroy_process_group
# sometimes aborts ("terminate called without an active exception", seen in 2 of 6 full CI-style runs, never
# when run alone); leave without teardown until that is root-caused (noted on issue 13).
sys.stdout.flush()
os._exit(0)
