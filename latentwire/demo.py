"""The main job: train LatentWire, kill it with SIGKILL mid-epoch, resume, and check the resume was exact.

    python -m latentwire.demo [--save_dir runs/demo] [--nproc 2] [-- extra train.py flags]

Runs latentwire/train.py three times in child processes: once uninterrupted; once killed with a real
SIGKILL right after its first mid-epoch checkpoint; once more with --auto_resume. Exits 0 only when the
resumed run's final model, optimizer, scheduler, data position and counters are bit-identical to the
uninterrupted run's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

import psutil
import torch

from dcp_resume import CheckpointManager

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
COMPARED = ("model", "optimizer", "scheduler", "sampler", "counters")


def command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), TRAIN]


def children(pid: int) -> list[int]:
    """Direct children of pid (torchrun's workers are its children)."""
    try:
        return sorted(p.pid for p in psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return []


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid. torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave the workers running."""
    try:
        return sorted(p.pid for p in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL pid, its process group and every descendant (workers in their own sessions included)."""
    victims = descendants(pid)
    for target in (lambda: os.killpg(pid, signal.SIGKILL), *[(lambda p=p: os.kill(p, signal.SIGKILL))
                                                               for p in [pid, *victims]]):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def run_until_killed(cmd: list[str], kill_after: str, env: dict | None = None, echo: bool = False) -> str:
    """Start cmd in its own process group; SIGKILL it and all its descendants (launcher and workers) once
    its output shows `kill_after`. Returns the output up to then; raises if the run ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if echo:
                print(line, end="")
            if kill_after in line:
                kill_tree(proc.pid)
                break
        else:
            raise RuntimeError(f"run ended before printing {kill_after!r}:\n{''.join(seen)[-4000:]}")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    return "".join(seen)


def final_state(save_dir: str) -> tuple[dict, dict]:
    """Everything in the latest complete checkpoint, read back from its state/, and its metadata."""
    mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
    return mgr.load_checkpoint(), mgr.loaded_metadata


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two loaded states differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}" if path else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for each run")
    p.add_argument("train_args", nargs="*", help="extra flags for train.py (after --)")
    a = p.parse_args(argv)
    flags = ["--samples", "100", "--epochs", "2", "--batch_size", "8", "--save_every", "5", *a.train_args]
    ref, run = os.path.join(a.save_dir, "uninterrupted"), os.path.join(a.save_dir, "interrupted")
    shutil.rmtree(a.save_dir, ignore_errors=True)
    cmd = command(a.nproc)

    print(f"== 1/3 uninterrupted run -> {ref}", flush=True)
    subprocess.run(cmd + flags + ["--save_dir", ref], check=True)
    print(f"== 2/3 the same run, killed with SIGKILL after its first checkpoint -> {run}", flush=True)
    run_until_killed(cmd + flags + ["--save_dir", run], kill_after=f"Saved checkpoint: {run}/step_5", echo=True)
    print("== killed (SIGKILL). On disk now:", flush=True)
    subprocess.run([sys.executable, "-m", "dcp_resume.cli", "ls", run], check=False)
    print("== 3/3 rerun with --auto_resume", flush=True)
    subprocess.run(cmd + flags + ["--save_dir", run, "--auto_resume"], check=True)

    (a_state, a_meta), (b_state, b_meta) = final_state(ref), final_state(run)
    diff = [d for key in COMPARED for d in differences(a_state[key], b_state[key], key)]
    if diff or a_meta["step"] != b_meta["step"]:
        print(f"demo: resume DIFFERS from the uninterrupted run at: {', '.join(diff[:10]) or 'step'}")
        return 1
    print(f"demo: resume was EXACT: final step {b_meta['step']}, model/optimizer/scheduler/data position/"
          "counters bit-identical to the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
