"""`rank_dies.py SAVE_DIR TIMEOUT_S` under two plain processes (RANK/WORLD_SIZE/MASTER_* set, as srun
would): step 1 commits; at step 2 rank 1 SIGKILLs itself as the save starts writing. Rank 0 must fail
with CheckpointSaveError naming step 2 (exit 3), not hang."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import init_dist, make_training  # noqa: E402

from dcp_resume import CheckpointManager, CheckpointSaveError, dcp_io  # noqa: E402

save_dir, timeout_s = sys.argv[1], float(sys.argv[2])
rank = init_dist()
model, opt, sched = make_training(wrap=torch.nn.parallel.DistributedDataParallel)
mgr = CheckpointManager(save_dir, collective_timeout_s=timeout_s, enable_preemption_handling=False)
mgr.save_checkpoint({"model": model}, step=1)
_real_save = dcp_io.save


def die_on_rank1(*args, **kwargs):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _real_save(*args, **kwargs)


dcp_io.save = die_on_rank1
try:
    mgr.save_checkpoint({"model": model}, step=2)
except CheckpointSaveError as e:
    print(f"rank {rank} error: {e}", file=sys.stderr, flush=True)
    os._exit(3)  # the process group is broken; skip its teardown
print(f"rank {rank}: save of step 2 unexpectedly succeeded", flush=True)
