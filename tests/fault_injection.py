"""Fault injection: kill -9 a 2-rank training that saves every step at K random instants, resuming after
each kill, and check that nothing half-written is ever picked up and that the end result is exact.

    python tests/fault_injection.py --count 20 [--seed 0] [--work DIR]

Each attempt is `torchrun --nproc_per_node 2 latentwire/train.py --auto_resume ...` killed (SIGKILL to
launcher and workers) after a random delay drawn over the length of a whole run, so kills land in
start-up, training, shard writes, the commit and cleanup. After every kill: every checkpoint with a
metadata.json must be complete and load, and the one auto-resume would pick must be complete. At the
end the run is finished and compared bit for bit with an uninterrupted run. Exit 0 when all holds.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcp_resume import CheckpointManager  # noqa: E402
from dcp_resume.layout import list_checkpoints  # noqa: E402
from dcp_resume.storage import open_storage  # noqa: E402
from helpers import env  # noqa: E402
from latentwire.exactness import COMPARED, differences, final_state  # noqa: E402
from latentwire.processes import command, kill_tree  # noqa: E402

FLAGS = ["--tiny", "--samples", "48", "--batch_size", "4", "--epochs", "2", "--save_every", "1"]
ENV = env()


def run(save_dir: str, resume: bool, kill_after_s: float | None = None) -> int | None:
    """One attempt; returns its exit code, or None when it was killed."""
    cmd = command(2) + FLAGS + ["--save_dir", save_dir] + (["--auto_resume"] if resume else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                            start_new_session=True)
    try:
        proc.wait(timeout=kill_after_s)
        return proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # launcher and workers (which torchrun puts in sessions of their own)
        proc.wait()
        return None


def check_after_kill(save_dir: str) -> list[str]:
    """Violations: a committed checkpoint that is not complete or does not load; an incomplete pick."""
    problems = []
    mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
    for info in list_checkpoints(open_storage(save_dir), save_dir):
        if os.path.exists(os.path.join(info.path, "metadata.json")):
            if not info.complete:
                problems.append(f"{info.name} has metadata.json but is not complete: {info.reason}")
                continue
            try:
                mgr.load_checkpoint(info.path)
            except Exception as e:  # report every failure, keep checking
                problems.append(f"{info.name} does not load: {type(e).__name__}: {e}")
    latest = mgr.find_latest_checkpoint()
    if latest is not None and not os.path.exists(os.path.join(latest, "metadata.json")):
        problems.append(f"auto-resume would pick {latest}, which has no metadata.json")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=3, help="kills (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working directory (default: a fresh temp dir)")
    a = p.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="fault_injection_")
    ref, victim = os.path.join(work, "reference"), os.path.join(work, "victim")
    shutil.rmtree(ref, ignore_errors=True)
    shutil.rmtree(victim, ignore_errors=True)
    rng = random.Random(a.seed)

    t0 = time.monotonic()
    assert run(ref, resume=False) == 0, "the uninterrupted reference run failed"
    length = time.monotonic() - t0
    print(f"reference run: {length:.1f} s; killing {a.count} times at random instants in [0, {length:.1f}] s")
    kills, problems = 0, []
    while kills < a.count:
        delay = rng.uniform(0.0, length)
        code = run(victim, resume=True, kill_after_s=delay)
        if code is not None:  # finished before the kill: start over so every kill lands in a live run
            print(f"  attempt finished (exit {code}) before its kill at {delay:.1f} s; starting over")
            assert code == 0, f"attempt failed with exit {code}"
            shutil.rmtree(victim)
            continue
        kills += 1
        found = check_after_kill(victim)
        latest = CheckpointManager(victim).find_latest_checkpoint()  # read-only: no handlers, no lock
        left = [i.name for i in list_checkpoints(open_storage(victim), victim) if not i.complete]
        print(f"  kill {kills}/{a.count} at {delay:.1f} s: latest {os.path.basename(latest or '-')}, "
              f"incomplete left {left or 'none'}, violations {len(found)}")
        problems += [f"kill {kills}: {x}" for x in found]
        if latest and final_state(victim)[1]["kind"] == "final":  # nothing left to kill: start over
            shutil.rmtree(victim)
    assert run(victim, resume=True) == 0, "the final resumed run failed"
    (a_state, a_meta), (b_state, b_meta) = final_state(ref), final_state(victim)
    diff = [d for key in COMPARED for d in differences(a_state[key], b_state[key], key)]
    if a_meta["step"] != b_meta["step"] or diff:
        problems.append(f"final state differs from the uninterrupted run at {diff[:5] or 'step'}")
    print(f"{a.count} kills, {len(problems)} violations; final state "
          f"{'bit-identical' if not diff else 'DIFFERENT'} to the uninterrupted run (step {b_meta['step']})")
    for x in problems:
        print("VIOLATION", x)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
