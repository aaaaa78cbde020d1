"""The main job until the trainer lands: train, get killed with SIGKILL mid-run, resume, check exactness.

    python -m latentwire.demo [--save_dir runs/demo] [--steps 30] [--kill_at 17]

Runs the same tiny training twice in child processes: once uninterrupted, once killed with a real
SIGKILL after step --kill_at and resumed from the latest complete checkpoint. Exits 0 only when the
resumed run's final weights and optimizer state are bit-identical to the uninterrupted run's.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys

import torch

from dcp_resume import CheckpointManager


def _training(save_dir: str, steps: int, kill_at: int | None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    mgr = CheckpointManager(save_dir, save_interval=5, keep_last_n=2)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "step": 0, "rng": torch.get_rng_state()}
    if mgr.find_latest_checkpoint():
        got = mgr.load_checkpoint(state=state)
        torch.set_rng_state(got["rng"])
        state["step"] = got["step"]
        print(f"Resuming from checkpoint: {mgr.find_latest_checkpoint()} (step {got['step']})", flush=True)
    for step in range(state["step"] + 1, steps + 1):
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step(), sched.step(), opt.zero_grad()
        if mgr.should_save(step) or step == steps:
            state.update(step=step, rng=torch.get_rng_state())
            mgr.save_checkpoint(state, step=step, kind="final" if step == steps else "step")
        if step == kill_at:
            print(f"demo: killing myself with SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()


def _child(save_dir: str, steps: int, kill_at: int | None) -> int:
    args = [sys.executable, "-m", "latentwire.demo", "--child", "--save_dir", save_dir, "--steps", str(steps)]
    return subprocess.call(args + ["--kill_at", str(kill_at or 0)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--kill_at", type=int, default=17, help="0: never")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _training(a.save_dir, a.steps, a.kill_at)
        return 0
    ref, run = os.path.join(a.save_dir, "uninterrupted"), os.path.join(a.save_dir, "interrupted")
    shutil.rmtree(a.save_dir, ignore_errors=True)
    assert _child(ref, a.steps, None) == 0
    code = _child(run, a.steps, a.kill_at)
    print(f"demo: first attempt exited with {code} (-9 = SIGKILL); resuming")
    assert _child(run, a.steps, None) == 0
    final = [CheckpointManager(d, verbose=False).load_checkpoint() for d in (ref, run)]
    same = all(torch.equal(x, y) for k in ("model", "optimizer") for x, y in
               zip(_tensors(final[0][k]), _tensors(final[1][k])))
    print("demo: resume was EXACT (bit-identical model and optimizer)" if same else "demo: resume DIFFERS")
    return 0 if same else 1


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for k in sorted(tree):
            yield from _tensors(tree[k])


if __name__ == "__main__":
    sys.exit(main())
