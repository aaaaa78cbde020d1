"""Multi-node failures as a user of the trainer sees them, on simulated nodes (tests/nodes.py: UTS and mount
namespaces, a c10d rendezvous on 127.0.0.1):
- a save_dir that is each node's own local disk fails the first save on every rank, in one line naming the file
  rank 0 cannot see, the rank and host that wrote it, and the fix; nothing is committed;
- a job killed with kill -9 on host0/host1 resumes on host2/host3 without hand work: after the lock's lease runs
  out unrenewed, or at once when the requeue has the same job identity (SLURM_JOB_ID);
- a live job on another host keeps its save_dir: a second job is refused in one line (exit 2), changing nothing;
- a lock path that is a FIFO, a symlink or a directory is refused in one line (exit 2), with nothing written
  through it and nothing hanging."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import env, stat_snapshot
from nodes import hold_lock, need_namespaces, nodes, run_nodes
from trainer_runs import BASE, TRAIN, kill_tree

from dcp_resume.savedir_lock import LOCK_FILE

pytestmark = pytest.mark.slow  # integration: real trainer runs on simulated nodes

FLAGS = ["--tiny", "--samples", "48", "--batch_size", "2", "--save_every", "3", "--epochs", "2"]  # 4 ranks: 6 steps/epoch


def error_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith("error: ")]


def trainer(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)


def test_a_save_dir_local_to_each_node_fails_the_first_save_on_every_rank_and_commits_nothing(tmp_path):
    need_namespaces()
    save_dir, seen = tmp_path / "run", tmp_path / "seen"
    save_dir.mkdir()
    codes, outs = run_nodes(tmp_path, nodes(["host0", "host1"], 1, *BASE, "--epochs", "1", "--save_dir", save_dir,
                                            private=str(save_dir), listing=str(seen)))
    assert codes == [1, 1], outs
    expected = re.compile(
        rf"error: save of step 3 not committed: {re.escape(str(save_dir))}/step_3/state/\S*__1_\d+\.distcp, "
        r"written by rank 1 on host (host[01]), is missing on rank 0's host (host[01]), so not every rank writes "
        rf"to the same save_dir {re.escape(str(save_dir))}\. save_dir must be a filesystem every node mounts \(or "
        r"an object store such as s3://\)")
    lines = [error_lines(out) for out in outs]
    assert [len(found) for found in lines] == [1, 1], outs  # one line on each node's one rank
    match = expected.fullmatch(lines[0][0])
    assert match and lines[1] == lines[0] and set(match.groups()) == {"host0", "host1"}, lines
    rank0_host = match.group(2)
    for host in ("host0", "host1"):
        listing = (tmp_path / f"seen.{host}").read_text().split()
        assert not any(p.endswith("metadata.json") for p in listing), (host, listing)
        if host == rank0_host:  # rank 0 removed its uncommitted directory
            assert not any(p.startswith("./step_") for p in listing), listing
    assert os.listdir(save_dir) == []  # the nodes' disks were theirs alone


@pytest.mark.parametrize("job", [None, "4242"], ids=["lease_runs_out", "same_slurm_job"])
def test_a_job_killed_on_two_hosts_resumes_on_two_others_without_hand_work(tmp_path, job):
    need_namespaces()
    run = tmp_path / "run"
    job_env = {"SLURM_JOB_ID": job} if job else {}
    args = [*FLAGS, "--save_dir", run, "--lock_lease_s", 3]
    _, outs = run_nodes(tmp_path, nodes(["host0", "host1"], 2, *args), kill_after=f"Saved checkpoint: {run}/step_",
                        extra_env=job_env)
    assert "Training complete" not in "".join(outs)
    left = json.loads((run / LOCK_FILE).read_text())  # kill -9: nobody released it
    assert left["host"] in ("host0", "host1") and left["lease_s"] == 3 and left["job"] == job

    codes, outs = run_nodes(tmp_path, nodes(["host2", "host3"], 2, *args, "--auto_resume"), extra_env=job_env)
    text = "".join(outs)
    assert codes == [0, 0], text[-4000:]
    holder = f"pid {left['pid']} on host {left['host']}"
    taking_over = f"Taking over stale lock {run / LOCK_FILE}: "
    if job is None:
        assert (f"Waiting up to 5 s for the save_dir lock held by {holder} to be renewed (lease 3 s); it is taken "
                "over if not") in text
        assert re.search(rf"{re.escape(taking_over + holder)} \(holder since {re.escape(left['start_time'])}\) did "
                         r"not renew its lease \(3 s\) for \d+ s", text), text[-4000:]
    else:
        assert f"{taking_over}held by {holder} of this same job (SLURM_JOB_ID=4242), which was restarted" in text
        assert "Waiting up to" not in text
    assert f"Resuming from checkpoint: {run}/step_" in text and "Training complete" in text
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_a_live_job_on_another_host_keeps_its_save_dir(tmp_path):
    need_namespaces()
    run = tmp_path / "run"
    trained = trainer(*BASE, "--epochs", "1", "--save_dir", run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    holder = hold_lock("hostX", run, lease_s=1)
    try:
        lock = (run / LOCK_FILE).read_text()
        held = json.loads(lock)
        before = {k: v for k, v in stat_snapshot(str(run)).items() if k != LOCK_FILE}  # the lease changes its mtime
        second = trainer(*BASE, "--save_dir", run, "--auto_resume", "--lock_wait_s", 1)
        assert second.returncode == 2, second.stderr[-3000:]
        assert error_lines(second.stderr) == [
            f"error: {run} is in use by another writer: {run / LOCK_FILE} is held by pid {held['pid']} on host hostX "
            f"since {held['start_time']}, which renewed its lease while this job watched. One writer per save_dir: "
            "stop that job or save to another save_dir"], second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert {k: v for k, v in stat_snapshot(str(run)).items() if k != LOCK_FILE} == before
        assert (run / LOCK_FILE).read_text() == lock
    finally:
        kill_tree(holder.pid)
        holder.wait()


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_hostile_lock_file_is_refused_by_the_trainer_in_one_line(tmp_path, kind):
    run, outside = tmp_path / "run", tmp_path / "outside.txt"
    run.mkdir()
    outside.write_text("someone else's file\n")
    lock = run / LOCK_FILE
    {"fifo": os.mkfifo, "directory": os.mkdir, "symlink": lambda p: os.symlink(outside, p)}[kind](lock)
    before, outside_before = stat_snapshot(str(run)), os.stat(outside)
    proc = trainer(*BASE, "--save_dir", run, timeout=120)  # a FIFO opened for reading would hang it
    assert proc.returncode == 2, proc.stderr[-3000:]
    what = {"fifo": "not a regular file (a FIFO, device or socket)", "symlink": "a symlink",
            "directory": "a directory"}[kind]
    assert error_lines(proc.stderr) == [f"error: the save_dir lock {lock} is {what}; remove it (dcp-resume creates "
                                        "it as a regular file)"]
    assert "Traceback" not in proc.stderr
    assert outside.read_text() == "someone else's file\n" and os.stat(outside).st_mtime_ns == outside_before.st_mtime_ns
    assert os.listdir(run) == [LOCK_FILE] and stat_snapshot(str(run)) == before
