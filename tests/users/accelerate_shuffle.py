"""A user's accelerate training script: shuffled DataLoader, 2 epochs, stop mid-epoch and resume.

  accelerate launch --multi_gpu --num_processes 2 tests/users/accelerate_shuffle.py --save_dir D --log L \
      [--seedable] [--stateful] [--stop_after N | --resume] [--check] [--final F]

Writes `<log>.rank<R>` with one line per step: `global_step epoch step_in_epoch ids...`.
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402
from dcp_resume.accelerate_loaders import unresumable_loader_problem  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--save_dir", required=True)
p.add_argument("--log", required=True)
p.add_argument("--final", default=None)
p.add_argument("--seedable", action="store_true", help="DataLoaderConfiguration(use_seedable_sampler=True)")
p.add_argument("--stateful", action="store_true", help="use_stateful_dataloader=True, loader in the checkpoint")
p.add_argument("--stop_after", type=int, default=0, help="save and exit after this global step")
p.add_argument("--resume", action="store_true")
p.add_argument("--check", action="store_true", help="print unresumable_loader_problem() before the save")
p.add_argument("--samples", type=int, default=48)
p.add_argument("--epochs", type=int, default=2)
args = p.parse_args()

config = DataLoaderConfiguration(use_seedable_sampler=args.seedable, use_stateful_dataloader=args.stateful)
accelerator = Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=config)
set_seed(1234)
model = nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
gen = torch.Generator().manual_seed(0)
ds = TensorDataset(torch.arange(args.samples), torch.randn(args.samples, 4, generator=gen),
                   torch.randn(args.samples, 1, generator=gen))
loader = DataLoader(ds, batch_size=4, shuffle=True)
model, opt, loader = accelerator.prepare(model, opt, loader)

manager = CheckpointManager(args.save_dir, save_interval=0, keep_last_n=None, enable_preemption_handling=False,
                            verbose=False)


def state(epoch, step_in_epoch, global_step):
    s = {"model": model, "optimizer": opt,
         "progress": {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step}}
    if args.stateful:
        s["loader"] = loader
    return s


start_epoch = start_step = g = 0
if args.resume:
    loaded = manager.load_checkpoint(state=state(0, 0, 0))
    prog = loaded["progress"]
    start_epoch, start_step, g = int(prog["epoch"]), int(prog["step_in_epoch"]), int(prog["global_step"])
    print(f"resumed at epoch {start_epoch} step {start_step} global {g}", flush=True)

rank = accelerator.process_index
mode = "a" if args.resume else "w"
os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
with open(f"{args.log}.rank{rank}", mode) as log:
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # order of a SeedableRandomSampler = f(seed, epoch); harmless otherwise
        first = start_step if epoch == start_epoch else 0
        it = loader
        if first and not args.stateful:  # a stateful loader resumes its own position from load_state_dict
            it = accelerator.skip_first_batches(loader, first)
        for i, (ids, x, y) in enumerate(it, start=first):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            g += 1
            log.write(f"{g} {epoch} {i} {' '.join(map(str, ids.tolist()))}\n")
            log.flush()
            if g == args.stop_after:
                if args.check:
                    print(f"UNRESUMABLE: {unresumable_loader_problem()}", flush=True)
                done = i + 1 == len(loader)
                manager.save_checkpoint(state(epoch + done, 0 if done else i + 1, g), step=g, epoch=epoch)
                accelerator.wait_for_everyone()
                print(f"stopped after global step {g}", flush=True)
                manager.close()
                accelerator.end_training()  # see the end of the script
                sys.exit(0)

weights = accelerator.unwrap_model(model).state_dict()
digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in weights.values()))
print(f"rank {rank} final checksum {digest.hexdigest()} after {g} steps", flush=True)
if args.final and accelerator.is_main_process:
    torch.save({k: v.detach().cpu().clone() for k, v in weights.items()}, args.final)
accelerator.wait_for_everyone()
# As accelerate asks: the process group ends before the interpreter does. Left to interpreter teardown, a gloo
# worker thread still finishing DDP's last all-reduce can need the GIL after finalization began and abort the
# process ("terminate called without an active exception"; seen in ~1 of 12 loaded runs of this script).
manager.close()
accelerator.end_training()
