"""`dcp-resume prune`, the real console script: the engine's retention by hand, --dry-run, and the save_dir lock.

The save_dir (a real 2-rank run, damaged): step_3, epoch1 (is_best), step_9, step_12 (corrupt), step_15
(incomplete). With --keep 1 the retention policy keeps step_12 (the newest complete one by sizes) and epoch1
(best); prune also keeps step_9, which --auto_resume loads since step_12 fails its hashes.
"""
import json
import os
import socket
import subprocess

import pytest
from cli_helpers import cli, copy_run, damage, run_main, trained_runs
from helpers import stat_snapshot

from dcp_resume.layout import utc_now_iso
from dcp_resume.savedir_lock import LOCK_FILE


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_runs(str(tmp_path_factory.getbasetemp() / "cli_runs"))["fsdp2_ws2"]


@pytest.fixture
def save_dir(run_dir, tmp_path):
    return damage(copy_run(run_dir, tmp_path / "run"))


def checkpoints(save_dir):
    return sorted(n for n in os.listdir(save_dir) if n.startswith(("step_", "epoch")))


def test_dry_run_changes_nothing_and_prune_does_what_it_showed(save_dir):
    before = stat_snapshot(save_dir)
    dry = cli("prune", save_dir, "--keep", "1", "--dry-run")
    dry_no_best = run_main("prune", save_dir, "--keep", "2", "--no-keep-best", "--dry-run")
    assert stat_snapshot(save_dir) == before  # not a file, directory or mtime changed; no lock file taken
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would remove step_3 (beyond the newest 1)",
        "would remove step_15 (incomplete: no metadata.json (save interrupted before its commit))",
        "would keep 3: epoch1 (best), step_9 (--auto_resume loads it), step_12 (CORRUPT: `dcp-resume verify` "
        "names the file)"]
    assert dry_no_best.stdout.splitlines()[:3] == [
        "would remove step_3 (beyond the newest 2)", "would remove epoch1 (beyond the newest 2)",
        "would remove step_15 (incomplete: no metadata.json (save interrupted before its commit))"]

    r = cli("prune", save_dir, "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == dry.stdout.replace("would remove", "removed").replace("would keep", "kept")
    assert checkpoints(save_dir) == ["epoch1", "step_12", "step_9"]
    assert not os.path.exists(os.path.join(save_dir, LOCK_FILE))  # taken for the prune, then released


def test_refuses_while_a_live_job_holds_the_lock(save_dir):
    holder = subprocess.Popen(["sleep", "300"])
    try:
        lock = os.path.join(save_dir, LOCK_FILE)
        with open(lock, "w") as f:  # what a training job's rank 0 writes at its first save
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "start_time": utc_now_iso()}, f)
        before = stat_snapshot(save_dir)
        r = run_main("prune", save_dir, "--keep", "1")
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith(f"dcp-resume: error: not pruning: {save_dir} is in use by another writer: "
                                   f"{os.path.realpath(save_dir)}/{LOCK_FILE} is held by pid {holder.pid} on host "
                                   f"{socket.gethostname()}")
        assert r.stderr.count("\n") == 1
        assert stat_snapshot(save_dir) == before
    finally:
        holder.kill()
        holder.wait()
