"""`async_roundtrip.py OUT_DIR` under torchrun: async saves of DDP and FSDP2 state, with the model and
optimizer changed right after each save returns; the reload must hold the state as of the save."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import full_state, fsdp2, init_dist, make_training, train_steps  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402

out = sys.argv[1]
rank = init_dist()
for kind, wrap in (("ddp", torch.nn.parallel.DistributedDataParallel), ("fsdp2", fsdp2)):
    model, opt, sched = make_training(seed=0, wrap=wrap)
    train_steps(model, opt, sched, 3)
    ref = full_state(model, opt)
    with CheckpointManager(os.path.join(out, kind), async_save=True, enable_preemption_handling=False) as mgr:
        mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched}, step=3)
        train_steps(model, opt, sched, 2)  # changes parameters and Adam state while the write runs
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    model2, opt2, sched2 = make_training(seed=5, wrap=wrap)
    mgr = CheckpointManager(os.path.join(out, kind), enable_preemption_handling=False)
    mgr.load_checkpoint(state={"model": model2, "optimizer": opt2, "scheduler": sched2})
    got = full_state(model2, opt2)
    if rank == 0:
        torch.save({"ref": ref, "got": got}, os.path.join(out, f"{kind}.pt"))
dist.destroy_process_group()
