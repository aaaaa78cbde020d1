"""Per-rank state through the engine (run under torchrun): `save DIR` saves, at every rank, an object whose
state differs per rank next to one that agrees, then loads into fresh objects; `load DIR` loads a checkpoint
of another world size with both per_rank_policy values. Prints one line per check; the test reads them."""
import sys
import warnings

import torch
import torch.distributed as dist
from common import Tiny, init_dist

from dcp_resume import CheckpointManager, CheckpointMismatchError, InexactResumeWarning, exact_gradient_sync


class Counter:
    """A user's own stateful object: `v` and `t` differ per rank."""

    def __init__(self, v: int):
        self.v, self.t = v, torch.tensor([float(v)])

    def state_dict(self):
        return {"v": self.v, "t": self.t.clone()}

    def load_state_dict(self, state):
        self.v, self.t = state["v"], state["t"]


def say(line: str) -> None:
    """One write per line: ranks share the pipe, and print's separate newline write could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def state(rank: int, fresh: bool, model):
    return {"model": model, "obj": Counter(-1 if fresh else 100 + rank), "same": Counter(-1 if fresh else 7)}


def main():
    mode, save_dir = sys.argv[1], sys.argv[2]
    rank = init_dist()
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(Tiny())
    mgr = CheckpointManager(save_dir, save_interval=0, keep_last_n=None, enable_preemption_handling=False,
                            verbose=False)  # quiet: ranks' lines must not interleave with the log
    if mode == "save":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.save_checkpoint(state(rank, False, ddp), step=1)
            exact_gradient_sync(ddp)
            mgr.save_checkpoint(state(rank, False, ddp), step=2)
        warned = [w for w in caught if issubclass(w.category, InexactResumeWarning)]
        say(f"rank {rank} inexact warnings: {len(warned)}")
        if warned:
            say(f"rank {rank} warning: {warned[0].message}")
        live = state(rank, True, ddp)
        loaded = mgr.load_checkpoint(state=live)
        say(f"rank {rank} obj {live['obj'].v} {live['obj'].t.item():g} same {live['same'].v} "
              f"loaded {sorted(loaded)}")
    else:
        live = state(rank, True, ddp)
        try:
            mgr.load_checkpoint(state=live)
            say(f"rank {rank} refuse: loaded")
        except CheckpointMismatchError as e:
            say(f"rank {rank} refuse: {e}".replace("\n", " | "))
        loaded = mgr.load_checkpoint(state=live, per_rank_policy="fresh")
        say(f"rank {rank} fresh: obj {live['obj'].v} same {live['same'].v} loaded {sorted(loaded)}")
    mgr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
