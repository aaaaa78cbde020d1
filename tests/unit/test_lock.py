"""One writer per save_dir: `<save_dir>/.dcp-resume.lock` (host, pid, start_time), taken by rank 0 at the
first save and released by close(). A second writer while the holder lives is refused, naming the holder;
a lock whose holder is gone is taken over with a warning; readers never touch it."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from common import Tiny
from conftest import ROOT

from dcp_resume import CheckpointManager
from dcp_resume.errors import SaveDirLockedError

LOCK = ".dcp-resume.lock"
HOST = socket.gethostname()

HOLDER = """
import sys, time
sys.path.insert(0, "tests/workers")
from common import Tiny
from dcp_resume import CheckpointManager
mgr = CheckpointManager(sys.argv[1], verbose=False)
mgr.save_checkpoint({"model": Tiny()}, step=1)
print("saved", flush=True)
time.sleep(600)  # holds the lock until killed
"""


def lock_of(save_dir):
    return json.loads((save_dir / LOCK).read_text())


def test_taken_at_first_save_released_by_close_and_readers_never_take_it(tmp_path):
    mgr = CheckpointManager(tmp_path, verbose=False)
    assert not (tmp_path / LOCK).exists()  # construction does not lock
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    held = lock_of(tmp_path)
    assert (held["host"], held["pid"]) == (HOST, os.getpid()) and held["start_time"].endswith("+00:00")
    mgr.close()
    assert not (tmp_path / LOCK).exists()

    reader = CheckpointManager(tmp_path, verbose=False)
    assert reader.find_latest_checkpoint() == str(tmp_path / "step_1")
    reader.load_checkpoint(state={"model": Tiny()})
    reader.close()
    assert not (tmp_path / LOCK).exists()


def test_second_writer_in_another_process_is_refused_then_takes_over_the_stale_lock(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = holder.stdout.readline()
        assert line == "saved\n", holder.stderr.read() if holder.poll() is not None else line
        held = lock_of(tmp_path)
        assert (held["host"], held["pid"]) == (HOST, holder.pid)

        mgr = CheckpointManager(tmp_path, verbose=False, lock_wait_s=0)
        assert mgr.find_latest_checkpoint() == str(tmp_path / "step_1")  # reading needs no lock
        mgr.load_checkpoint(state={"model": Tiny()})
        with pytest.raises(SaveDirLockedError, match=(
                rf"^{re.escape(str(tmp_path))} is in use by another writer: {re.escape(str(tmp_path / LOCK))} is "
                rf"held by pid {holder.pid} on host {re.escape(HOST)} since {re.escape(held['start_time'])}. "
                r"One writer per save_dir: stop that job or save to another save_dir$")):
            mgr.save_checkpoint({"model": Tiny()}, step=2)
        assert not (tmp_path / "step_2").exists() and lock_of(tmp_path) == held
    finally:
        holder.kill()  # SIGKILL: no close(), the lock file stays behind
        holder.wait()

    assert lock_of(tmp_path) == held
    caplog.set_level("WARNING", logger="dcp_resume")
    mgr.save_checkpoint({"model": Tiny()}, step=2)
    assert (f"Taking over stale lock {tmp_path / LOCK}: pid {holder.pid} on host {HOST} (holder since "
            f"{held['start_time']}) is gone") in caplog.text
    assert lock_of(tmp_path)["pid"] == os.getpid() and mgr.find_latest_checkpoint() == str(tmp_path / "step_2")
    mgr.close()
    assert not (tmp_path / LOCK).exists()


def test_managers_in_one_process_share_the_lock(tmp_path):
    a, b = CheckpointManager(tmp_path, verbose=False), CheckpointManager(tmp_path, verbose=False)
    a.save_checkpoint({"model": Tiny()}, step=1)
    b.save_checkpoint({"model": Tiny()}, step=2)
    a.close()
    assert lock_of(tmp_path)["pid"] == os.getpid()  # b still writes
    b.close()
    assert not (tmp_path / LOCK).exists()


def test_lock_held_on_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "other-node", "pid": 4242,
                                             "start_time": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(SaveDirLockedError, match=(
            r"held by pid 4242 on host other-node since 2024-01-01T00:00:00\+00:00\. One writer per save_dir: stop "
            rf"that job or save to another save_dir; its host cannot be checked from here, so if that job is gone, "
            rf"remove {re.escape(str(tmp_path / LOCK))}$")):
        CheckpointManager(tmp_path, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    assert not (tmp_path / "step_1").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_pid_now_used_by_a_newer_process_is_stale(tmp_path, caplog):
    newer = subprocess.Popen(["sleep", "60"])  # a live process with the lock's pid, started after the lock
    try:
        (tmp_path / LOCK).write_text(json.dumps({"host": HOST, "pid": newer.pid,
                                                 "start_time": "2024-01-01T00:00:00+00:00"}))
        caplog.set_level("WARNING", logger="dcp_resume")
        with CheckpointManager(tmp_path, verbose=False) as mgr:
            mgr.save_checkpoint({"model": Tiny()}, step=1)
        assert f"pid {newer.pid} now belongs to a process started after the lock was taken" in caplog.text
    finally:
        newer.kill()
        newer.wait()


def test_lock_without_readable_owner_is_refused_while_fresh_and_taken_over_when_old(tmp_path, caplog):
    (tmp_path / LOCK).write_text("")  # as left by a writer that died between creating and writing it
    with pytest.raises(SaveDirLockedError, match="was just created and holds no owner yet"):
        CheckpointManager(tmp_path, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(tmp_path, verbose=False) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
    assert re.search(r"Taking over stale lock .*: it holds no readable owner and is \d+ s old", caplog.text)
