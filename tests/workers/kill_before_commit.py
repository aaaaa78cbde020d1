"""`kill_before_commit.py SAVE_DIR [OUT_DIR]`: commits step_1, then SIGKILLs rank 0 at step_2 after every rank's
shards (and DCP's .metadata) are on disk but before metadata.json: the worst instant for a crash.
Step 1's weights go to OUT_DIR/step1.pt (default: SAVE_DIR/..), for comparison."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import init_dist, make_training, train_steps  # noqa: E402

from dcp_resume import CheckpointManager, dcp_io  # noqa: E402

save_dir = sys.argv[1]
out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(save_dir, "..")
rank = init_dist()
model, opt, sched = make_training(wrap=torch.nn.parallel.DistributedDataParallel)
mgr = CheckpointManager(save_dir, keep_last_n=3)
state = {"model": model, "optimizer": opt, "scheduler": sched}
train_steps(model, opt, sched, 1)
mgr.save_checkpoint(state, step=1)
if rank == 0:
    torch.save({k: v.clone() for k, v in model.module.state_dict().items()}, os.path.join(out_dir, "step1.pt"))

_real_save = dcp_io.save


def save_then_die(*args, **kwargs):
    _real_save(*args, **kwargs)
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)


dcp_io.save = save_then_die
train_steps(model, opt, sched, 1)
mgr.save_checkpoint(state, step=2)
raise SystemExit("unreachable: rank 0 was killed inside the save")
