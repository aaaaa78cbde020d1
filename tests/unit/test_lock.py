"""One writer per save_dir: `<save_dir>/.dcp-resume.lock` (host, pid, start_time), taken by rank 0 at the
first save and released by close(). A second writer while the holder lives is refused, naming the holder;
a lock whose holder is gone is taken over with a warning; readers never touch it."""
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from common import Tiny
from conftest import ROOT

from dcp_resume import CheckpointManager, savedir_lock
from dcp_resume.errors import CheckpointSaveError, SaveDirLockedError, StorageError
from dcp_resume.layout import utc_now_iso
from dcp_resume.storage import open_storage

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


def assert_taken_over_once_old(save_dir, caplog):
    """A lock without a readable owner, a minute old: the next save takes it over, saying why."""
    old = time.time() - 60
    os.utime(save_dir / LOCK, (old, old))
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(save_dir, verbose=False) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
    assert re.search(r"Taking over stale lock .*: it holds no readable owner and is \d+ s old", caplog.text)


def test_lock_without_readable_owner_is_refused_while_fresh_and_taken_over_when_old(tmp_path, caplog):
    (tmp_path / LOCK).write_text("")  # as left by a writer that died between creating and writing it
    with pytest.raises(SaveDirLockedError, match="was just created and holds no owner yet"):
        CheckpointManager(tmp_path, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    assert_taken_over_once_old(tmp_path, caplog)


# -- leases, job identity, a holder that lost its lock, hostile lock files ------------------------------------

def other_host_lock(save_dir, **fields):
    """A lock as a job on another host writes it (a dead one unless something renews it)."""
    content = {"host": "other-node", "pid": 4242, "start_time": "2024-01-01T00:00:00+00:00", **fields}
    (save_dir / LOCK).write_text(json.dumps(content))
    return content


def renewing(path, stop, every_s=0.2):
    """A thread touching `path` as a live holder on another host renews its lease."""
    def touch():
        while not stop.wait(every_s):
            os.utime(path)
    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    return thread


def test_the_lock_records_its_lease_and_job_and_renews_it_until_released(tmp_path, monkeypatch):
    monkeypatch.delenv("DCP_RESUME_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = savedir_lock.acquire(open_storage(str(tmp_path)), str(tmp_path), lease_s=0.4)  # renewed every 0.1 s
    held = lock_of(tmp_path)
    assert (held["lease_s"], held["job"], held["pid"]) == (0.4, "777", os.getpid())
    first = os.stat(tmp_path / LOCK).st_mtime_ns
    deadline = time.monotonic() + 30
    while os.stat(tmp_path / LOCK).st_mtime_ns == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    assert lock_of(tmp_path) == held  # renewed, not rewritten
    lock.release()
    time.sleep(0.3)  # no renewal after release (the lease thread is stopped): nothing comes back
    assert not (tmp_path / LOCK).exists()


def test_unrenewed_lock_on_another_host_is_taken_over_after_its_lease(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    held = other_host_lock(tmp_path, lease_s=1, job=None)
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(tmp_path, verbose=False, lock_wait_s=0) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
        assert lock_of(tmp_path)["pid"] == os.getpid()
    assert ("Waiting up to 3 s for the save_dir lock held by pid 4242 on host other-node to be renewed (lease 1 s); "
            "it is taken over if not") in caplog.text
    assert re.search(rf"Taking over stale lock {re.escape(str(tmp_path / LOCK))}: pid 4242 on host other-node "
                     rf"\(holder since {re.escape(held['start_time'])}\) did not renew its lease \(1 s\) for \d+ s",
                     caplog.text)


def test_renewed_lock_on_another_host_is_refused_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    other_host_lock(tmp_path, lease_s=1, job="a-job")
    before = (tmp_path / LOCK).read_bytes()
    stop = threading.Event()
    thread = renewing(tmp_path / LOCK, stop)
    try:
        with pytest.raises(SaveDirLockedError, match=(
                r"is held by pid 4242 on host other-node since 2024-01-01T00:00:00\+00:00, which renewed its lease "
                r"while this job watched\. One writer per save_dir: stop that job or save to another save_dir$")):
            CheckpointManager(tmp_path, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    finally:
        stop.set()
        thread.join()
    assert (tmp_path / LOCK).read_bytes() == before and not (tmp_path / "step_1").exists()


@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "DCP_RESUME_JOB_ID"])
def test_lock_of_this_same_job_on_another_host_is_taken_over_at_once(tmp_path, caplog, monkeypatch, var):
    for name in savedir_lock.JOB_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "777")
    other_host_lock(tmp_path, lease_s=30, job="777")  # a lease watch would take 32 s and log otherwise
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(tmp_path, verbose=False, lock_wait_s=0) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
    assert (f"Taking over stale lock {tmp_path / LOCK}: held by pid 4242 on host other-node of this same job "
            f"({var}=777), which was restarted") in caplog.text
    assert "Waiting up to" not in caplog.text


def test_live_holder_on_this_host_is_refused_even_of_the_same_job(tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_RESUME_JOB_ID", "777")
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"host": HOST, "pid": live.pid, "start_time": utc_now_iso(),
                                                 "lease_s": 1, "job": "777"}))
        with pytest.raises(SaveDirLockedError, match=rf"held by pid {live.pid} on host {re.escape(HOST)} since"):
            CheckpointManager(tmp_path, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    finally:
        live.kill()
        live.wait()


def test_a_holder_whose_lock_was_taken_over_fails_its_next_save_in_one_line(tmp_path):
    mgr = CheckpointManager(tmp_path, verbose=False)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    (tmp_path / LOCK).unlink()  # what a job on another host does once this one's lease lapsed
    other_host_lock(tmp_path, lease_s=60, job=None, start_time="2030-01-01T00:00:00+00:00")
    with pytest.raises(CheckpointSaveError) as failed:
        mgr.save_checkpoint({"model": Tiny()}, step=2)
    assert str(failed.value) == (
        f"not committing step 2 to {tmp_path / 'step_2'}: this job no longer holds the save_dir lock "
        f"{tmp_path / LOCK}: it is now held by pid 4242 on host other-node since 2030-01-01T00:00:00+00:00. A lock "
        "not renewed for its lease (lease_s=60; e.g. this job was stopped) is taken over by the next job. One "
        "writer per save_dir: stop one of the two jobs, or raise --lock_lease_s (lock_lease_s)")
    assert not (tmp_path / "step_2").exists() and mgr.find_latest_checkpoint() == str(tmp_path / "step_1")
    mgr.close()
    assert lock_of(tmp_path)["pid"] == 4242  # the new holder's lock is left alone


def hostile(kind, path, outside):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a file outside":
        os.symlink(outside, path)
    elif kind == "dangling symlink":
        os.symlink(outside.parent / "nowhere", path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return sock
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("mknod is not allowed here")


HOSTILE = {"fifo": "not a regular file (a FIFO, device or socket)", "socket": "not a regular file (a FIFO, device "
           "or socket)", "device": "not a regular file (a FIFO, device or socket)", "directory": "a directory",
           "symlink to a file outside": "a symlink", "dangling symlink": "a symlink"}


def lstat_snapshot(root):
    """stat_snapshot that does not follow links (a dangling one included)."""
    return {str(p): (st.st_mode, st.st_size, st.st_mtime_ns) for p in [root, *root.rglob("*")]
            for st in [os.lstat(p)]}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_lock_path_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, kind):
    save_dir, outside = tmp_path / "run", tmp_path / "outside.txt"
    save_dir.mkdir()
    outside.write_text("not yours")
    keep = hostile(kind, save_dir / LOCK, outside)
    before = lstat_snapshot(tmp_path)
    with pytest.raises(StorageError) as refused:
        CheckpointManager(save_dir, verbose=False, lock_wait_s=0).save_checkpoint({"model": Tiny()}, step=1)
    assert str(refused.value) == (f"the save_dir lock {save_dir / LOCK} is {HOSTILE[kind]}; remove it (dcp-resume "
                                  "creates it as a regular file)")
    assert lstat_snapshot(tmp_path) == before and outside.read_text() == "not yours"
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("garbage", ["sparse", "nested"])
def test_a_huge_garbage_lock_is_read_only_in_part_and_taken_over_once_old(tmp_path, caplog, garbage):
    with open(tmp_path / LOCK, "wb") as f:
        if garbage == "sparse":
            f.truncate(1 << 40)  # 1 TiB: reading it whole would never end
        else:
            f.write(b"[" * 100_000)  # deeper than json's recursion limit
    assert_taken_over_once_old(tmp_path, caplog)


@pytest.mark.parametrize("lease", [0, -1, float("nan"), float("inf"), True, "60"])
def test_lock_lease_s_must_be_a_positive_number_of_seconds(tmp_path, lease):
    with pytest.raises(ValueError, match=rf"^lock_lease_s={re.escape(repr(lease))} must be a number of seconds > 0$"):
        CheckpointManager(tmp_path, lock_lease_s=lease)


def test_on_an_object_store_the_lease_is_renewed_by_putting_the_same_bytes_again():
    import fsspec

    url, fs = "memory://lock-lease-test/run", fsspec.filesystem("memory")
    lock = savedir_lock.acquire(open_storage(url), url, lease_s=0.4)
    key = "/lock-lease-test/run/" + LOCK
    held, first = fs.cat_file(key), fs.modified(key)
    deadline = time.monotonic() + 30
    while fs.modified(key) == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    assert fs.cat_file(key) == held
    lock.release()
    assert not fs.exists(key)


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_planted_takeover_guard_is_refused_in_one_line(tmp_path, kind):
    (tmp_path / LOCK).write_text("")  # a stale lock without an owner: the next writer would take it over
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    guard = tmp_path / (LOCK + ".takeover")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    guard.mkdir() if kind == "directory" else guard.symlink_to(outside)
    with pytest.raises(StorageError, match=rf"^the save_dir lock's takeover guard {re.escape(str(guard))} is a "
                                           rf"{kind}; remove it"):
        CheckpointManager(tmp_path, verbose=False).save_checkpoint({"model": Tiny()}, step=1)
    assert os.listdir(outside) == [] and not (tmp_path / "step_1").exists()


def test_a_release_the_collector_runs_inside_the_lock_module_waits_instead_of_deadlocking(tmp_path):
    """An unclosed manager's finalizer may run wherever the collector does, also while this process is taking
    a lock (seen: a test hung in json.loads inside acquire). It then releases once that section ends."""
    lock = savedir_lock.acquire(open_storage(str(tmp_path)), str(tmp_path))
    seen = []

    def collector_inside_acquire():
        with savedir_lock._locked():
            savedir_lock._release_when_free(lock)  # what weakref.finalize calls
            seen.append((tmp_path / LOCK).exists())

    worker = threading.Thread(target=collector_inside_acquire, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "deadlocked"
    assert seen == [True] and not (tmp_path / LOCK).exists()  # released once the section ended
