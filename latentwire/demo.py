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
import subprocess
import sys

from latentwire.exactness import COMPARED, differences, final_state
from latentwire.processes import command, run_until_killed


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
