"""A run claims its save_dir before it trains: a busy, rewound, reused, non-directory or read-only save_dir
is refused at start in one sentence (exit 2), with nothing written into it, not even train.log; a short lock
holder such as `dcp-resume prune` is waited for. Retention never deletes the checkpoint just committed."""
import os
import subprocess
import sys

import pytest
from helpers import stat_snapshot
from common import Tiny
from conftest import ROOT, WORKERS, run
from filesystems import mounted
from helpers import env, refused_at_start
from trainer_runs import BASE, launcher

from dcp_resume import CheckpointManager
from dcp_resume.cli import main as cli

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


def _train(*args):
    return run(list(map(str, launcher(1, "python") + BASE + list(args))), timeout=300, check=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A save_dir holding a finished run (periodic checkpoints every 3 steps, the newest 3 kept, a final)."""
    save_dir = str(tmp_path_factory.mktemp("claims") / "run")
    proc = _train("--save_dir", save_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_dir


def test_a_fresh_run_into_a_used_save_dir_is_refused_untouched(finished):
    before = stat_snapshot(finished)
    line = refused_at_start(_train("--save_dir", finished), f"save_dir {finished} already holds",
                    "a new run starting at step 0 would reuse its step numbers", "--auto_resume", "new save_dir")
    assert "(step 24)" in line
    assert stat_snapshot(finished) == before


def test_a_rewind_into_the_same_save_dir_is_refused_untouched(finished):
    oldest = min((n for n in os.listdir(finished) if n.startswith("step_")), key=lambda n: int(n[5:]))
    before = stat_snapshot(finished)
    refused_at_start(_train("--save_dir", finished, "--resume_from", f"{finished}/{oldest}", "--keep_last_n", 1),
             f"newer than {finished}/{oldest} (step {oldest[5:]})", "give the rewound run a new save_dir")
    assert stat_snapshot(finished) == before


def _holder(save_dir, seconds):
    proc = subprocess.Popen([sys.executable, os.path.join(WORKERS, "hold_lock.py"), save_dir, str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_job_on_a_busy_save_dir_is_refused_before_it_trains(finished):
    holder = _holder(finished, 120)
    try:
        before = stat_snapshot(finished)
        refused_at_start(_train("--save_dir", finished, "--auto_resume", "--lock_wait_s", 1),
                 f"{finished} is in use by another writer", f"pid {holder.pid}", "save to another save_dir")
        assert stat_snapshot(finished) == before  # not even a line in the other job's train.log
    finally:
        holder.kill()
        holder.wait()


def test_a_short_lock_holder_such_as_prune_is_waited_for(finished):
    """The holder lets go once the trainer says it is waiting (however long the trainer took to start)."""
    holder = _holder(finished, 120)
    cmd = list(map(str, launcher(1, "python") + BASE + ["--save_dir", finished, "--auto_resume", "--lock_wait_s", 60]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Waiting up to 60 s for the save_dir lock" in line:
                holder.terminate()  # releases the lock, as a finished prune does
        proc.wait(timeout=240)
    finally:
        holder.kill()
        holder.wait()
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen)
    assert proc.returncode == 0 and "Waiting up to 60 s for the save_dir lock" in out, out[-3000:]
    assert "Training already complete at epoch 2" in out


def test_a_save_dir_that_is_a_file_is_refused_at_start(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    refused_at_start(_train("--save_dir", tmp_path / "run"), "is a file, not a directory")
    assert (tmp_path / "run").read_text() == "not a directory"


def test_a_read_only_save_dir_and_export_out_arerefused_at_start(tmp_path):
    with CheckpointManager(tmp_path / "src", verbose=False, enable_preemption_handling=False) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
    with mounted("tmpfs", tmp_path, 1, read_only=True) as ro:
        refused_at_start(_train("--save_dir", os.path.join(ro, "run")), f"save_dir {ro}/run cannot be created",
                 "Read-only file system")
        assert cli(["export", str(tmp_path / "src" / "step_1"), "--out", os.path.join(ro, "m.safetensors")]) == 2
        assert os.listdir(ro) == []


def test_retention_never_deletes_the_checkpoint_just_committed(tmp_path):
    """An old run's step_1000 stays the highest step; keep_last_n=1 must not delete the new run's saves."""
    with CheckpointManager(tmp_path, verbose=False, enable_preemption_handling=False) as old:
        old.save_checkpoint({"model": Tiny()}, step=1000)
    with CheckpointManager(tmp_path, verbose=False, enable_preemption_handling=False, keep_last_n=1) as new:
        for step in (3, 6):
            assert os.path.isdir(new.save_checkpoint({"model": Tiny()}, step=step))
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["step_1000", "step_6"]
