"""One writer per save_dir: `<save_dir>/.dcp-resume.lock`, taken by rank 0 at start_run() (or its first save),
released by close().

The lock file holds JSON {host, pid, start_time, lease_s, job} and is created exclusively (O_CREAT|O_EXCL
locally, a conditional PUT with If-None-Match on S3), so of two processes creating it at once exactly one
succeeds. On fsspec backends without a conditional create it is check-then-write: best-effort. `job` is the
scheduler job's identity (DCP_RESUME_JOB_ID, else SLURM_JOB_ID; null when neither is set): a requeued job keeps it.

While held, the lease is renewed every lease_s/4 from a daemon thread: locally by touching the file (os.utime,
never through a link; touching a lock another job took over is harmless), on an object store by PUTting the
same content again if the object still holds it (check-then-write: best effort). A second writer finds it and:
- same host: refuses (SaveDirLockedError naming host, pid and since) while the holder is a live process, even of
  the same job; takes it over with a warning when the holder is gone: the pid is not running, is a zombie, or
  now belongs to a process started after the lock was taken (pid reuse).
- another host, same job: its requeue (or torchrun's restart) landed elsewhere: taken over at once, with a warning.
- another host, with a lease: watches the file (content and modification time) on its own monotonic clock, so no
  clocks are compared across hosts. Unchanged for the holder's lease_s (clamped to [1, 3600] s) plus 2 s: the
  holder is gone, and the lock is taken over with a warning. Changed: the holder is alive, and it is refused as
  on one host. This wait is logged, and happens whatever lock_wait_s is.
- another host, no lease (a lock from a dcp-resume before leases): refused, naming the file to remove.
A lock file with no readable content (its writer died between create and write) is stale once it is older than
a few seconds. Anything but a regular file at the lock's path (a symlink, directory, FIFO, device or socket) is
refused in one line (StorageError): never read through a link, never blocked on; at most 4 KiB of a lock are read.
A takeover removes the stale file under a short-lived `.takeover` guard, and only if it still holds the
stale content, so two processes taking over the same stale lock cannot both end up holding it.

A holder stopped for longer than its lease (SIGSTOP, a frozen node) may wake to find its lock taken over: lost()
says so before each commit, and that save fails, so two jobs never both commit into one save_dir. Two jobs
running at once with the same job identity on different hosts look like a requeue (the second takes the lock,
the first fails its next save): give concurrent runs of one SLURM job distinct DCP_RESUME_JOB_IDs.

Managers in one process share the lock (counted); the file goes when the last of them releases it.
Readers (find_latest_checkpoint, load_checkpoint, the CLI) never touch it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import socket
import threading
import time
import weakref
from typing import Any

import psutil

from .errors import SaveDirLockedError, StorageError
from .layout import utc_now_iso
from .logs import logger
from .storage import Storage

LOCK_FILE = ".dcp-resume.lock"
JOB_VARS = ("DCP_RESUME_JOB_ID", "SLURM_JOB_ID")  # the first set names this job; its requeue has the same
_UNREADABLE_GRACE_S = 5.0  # an empty/garbage lock younger than this may be mid-write by its creator
_READ_LIMIT = 4096  # a lock holds ~150 bytes; a bigger one is garbage, never read whole
_LEASE_RANGE_S = (1.0, 3600.0)  # a recorded lease_s is clamped into this (the file is anyone's to write)
_LEASE_MARGIN_S = 2.0  # how much longer than a lease a waiter watches before the holder counts as gone


class _Lease:
    """Renews a held lock from a daemon thread every lease_s/4 until stop()."""

    def __init__(self, store: Storage, path: str, raw: bytes, lease_s: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(store, path, raw, lease_s / 4),
                                        name="dcp-resume-lock-lease", daemon=True)
        self._thread.start()

    def _renew(self, store: Storage, path: str, raw: bytes, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                store.renew(path, raw)
            except Exception as e:  # best effort: a lease that lapses fails this job's next commit (lost())
                logger.debug("Could not renew the save_dir lock %s: %s", path, e)

    def stop(self, wait: bool = True) -> None:
        """No renewal after this returns (one in progress is waited for, unless not `wait`), so a removed lock
        stays removed."""
        self._stop.set()
        if wait and threading.current_thread() is not self._thread:  # (a finalizer's release may run on any thread)
            self._thread.join()


@dataclasses.dataclass
class _Holding:
    count: int  # managers of this process sharing the lock
    content: dict[str, Any]  # what the lock file holds while it is ours
    lease: _Lease


_held: dict[str, _Holding] = {}  # lock path -> this process's holding
_mutex = threading.Lock()
_owner: int | None = None  # the thread inside _locked()
_deferred: list["SaveDirLock"] = []  # releases a finalizer asked for inside _locked(), done when it ends


@contextlib.contextmanager
def _locked():
    """_mutex, noting which thread holds it. The garbage collector may run a manager's finalizer (a release) in
    the middle of this module's own critical section, on the same thread: that release waits for the section's
    end (_release_when_free) instead of deadlocking on _mutex."""
    global _owner
    try:
        with _mutex:
            _owner = threading.get_ident()
            try:
                yield
            finally:
                _owner = None
    finally:
        while _deferred:
            _deferred.pop().release()


def _release_when_free(lock: "SaveDirLock") -> None:
    """A finalizer's release (an unclosed manager collected, or the interpreter exiting)."""
    if _owner == threading.get_ident():
        _deferred.append(lock)
    else:
        lock.release()


class SaveDirLock:
    """This manager's share of the lock; release() is idempotent."""

    def __init__(self, store: Storage, path: str):
        self.store, self.path = store, path
        self._released = False

    def release(self) -> None:
        with _locked():
            if self._released:
                return
            self._released = True
            holding = _held.get(self.path)
            if holding is None:
                return
            holding.count -= 1
            if holding.count > 0:
                return
            del _held[self.path]
        holding.lease.stop()  # not under _mutex: a finalizer on the renewal thread may be waiting for it
        with _locked():
            if _still_ours(self.store, self.path, holding):  # not taken over or removed by hand
                self.store.remove_file(self.path)


def acquire(store: Storage, save_dir: str, owner: Any = None, wait_s: float = 0.0,
            lease_s: float = 60.0) -> SaveDirLock:
    """Take (or share, within this process) the save_dir's lock, or raise SaveDirLockedError (StorageError when
    the lock's path holds something other than a regular file). A live holder is waited for up to `wait_s`
    seconds (a short one, such as `dcp-resume prune`, is then let finish). The lock is renewed every lease_s/4
    while held; a waiter on another host takes it over once it goes unrenewed for lease_s. With `owner`, the
    share is also released when the owner is garbage-collected or the interpreter exits unclosed."""
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        try:
            lock = _acquire(store, save_dir, lease_s, announce=not waiting)
            break
        except SaveDirLockedError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not waiting:
                logger.warning("Waiting up to %.0f s for the save_dir lock: %s", wait_s, e)
                waiting = True
            time.sleep(min(0.5, left))
    if owner is not None:
        weakref.finalize(owner, _release_when_free, lock)
    return lock


def lost(store: Storage, save_dir: str) -> str | None:
    """Why this process no longer holds save_dir's lock, or None (it holds it, or never took it). Rank 0 asks
    before each commit: a holder stopped for longer than its lease (SIGSTOP, a frozen node) may have been taken
    over meanwhile, and two jobs must not both commit into one save_dir."""
    path = os.path.join(store.identity(save_dir), LOCK_FILE)
    holding = _held.get(path)  # no _mutex: another thread may hold it through a whole lease watch
    if holding is None or _still_ours(store, path, holding):
        return None
    holder = _parse(_read_raw(store, path))
    now = (f"it is now held by pid {holder.get('pid')} on host {holder.get('host')} since "
           f"{holder.get('start_time')}" if holder else "it was removed or replaced")
    return (f"this job no longer holds the save_dir lock {path}: {now}. A lock not renewed for its lease "
            f"(lease_s={holding.content['lease_s']:g}; e.g. this job was stopped) is taken over by the next job. "
            "One writer per save_dir: stop one of the two jobs, or raise --lock_lease_s (lock_lease_s)")


def _acquire(store: Storage, save_dir: str, lease_s: float, announce: bool) -> SaveDirLock:
    store.makedirs(save_dir)
    path = os.path.join(store.identity(save_dir), LOCK_FILE)
    with _locked():
        holding = _held.get(path)
        if holding is not None and _still_ours(store, path, holding):
            holding.count += 1
            return SaveDirLock(store, path)
        for _ in range(100):
            job = _job()
            mine = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": utc_now_iso(),
                    "lease_s": lease_s, "job": job and job[1]}
            raw_mine = (json.dumps(mine, sort_keys=True) + "\n").encode()
            if store.create_exclusive(path, raw_mine):
                # (managers of this process whose file was removed meanwhile share the new one)
                if holding is not None:  # its file was removed or replaced: a late renewal touches ours, harmless
                    holding.lease.stop(wait=False)  # (under _mutex, which that thread's finalizer may wait for)
                _held[path] = _Holding(holding.count + 1 if holding is not None else 1, mine,
                                       _Lease(store, path, raw_mine, lease_s))
                return SaveDirLock(store, path)
            holder, raw = _read_holder(store, path)
            if raw is None:
                continue  # released meanwhile: try again
            why = _stale(store, holder, path, announce)
            if why is None:
                if _read_raw(store, path) != raw:
                    continue  # released or replaced while we watched: look again
                raise SaveDirLockedError(_refusal(save_dir, path, holder))
            if _remove_if_unchanged(store, path, raw):
                logger.warning("Taking over stale lock %s: %s", path, why)
            else:
                time.sleep(0.05)  # another process is taking it over: see who won
    raise SaveDirLockedError(f"{path}: could not take the lock after 100 tries; another process keeps "
                             "changing it")


def _job() -> tuple[str, str] | None:
    """(variable, value) of this process's job identity, or None outside a scheduler job."""
    return next(((var, os.environ[var]) for var in JOB_VARS if os.environ.get(var)), None)


def _read_raw(store: Storage, path: str) -> bytes | None:
    """The lock's first _READ_LIMIT bytes, or None when there is none. Storage.open_read opens regular files
    only: never through a link, never blocking on a FIFO. Anything else there is refused (StorageError)."""
    try:
        with store.open_read(path) as f:
            return f.read(_READ_LIMIT)
    except FileNotFoundError:
        return None
    except OSError:
        what = _not_regular(store, path)
        if what is None:
            raise  # a regular file that cannot be read (permissions, I/O): the OS's own words
        raise StorageError(f"the save_dir lock {path} is {what}; remove it (dcp-resume creates it as a regular "
                           "file)") from None


def _not_regular(store: Storage, path: str) -> str | None:
    """What is at path when it is there but is not a regular file (planted: never followed nor opened)."""
    if store.is_link(path):
        return "a symlink"
    if store.isdir(path):
        return "a directory"
    return "not a regular file (a FIFO, device or socket)" if store.exists(path) and not store.isfile(path) else None


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # garbage, or a lock cut at _READ_LIMIT
        return None
    return obj if isinstance(obj, dict) else None


def _still_ours(store: Storage, path: str, holding: _Holding) -> bool:
    try:
        return _parse(_read_raw(store, path)) == holding.content
    except StorageError:  # replaced by a link, a directory, a FIFO...: not ours
        return False


def _read_holder(store: Storage, path: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """(parsed content or None, raw bytes or None when the file is gone), waiting briefly for a creator
    that has not written its content yet."""
    deadline = time.monotonic() + 0.5
    while True:
        raw = _read_raw(store, path)
        holder = _parse(raw)
        if raw is None or holder is not None or time.monotonic() > deadline:
            return holder, raw
        time.sleep(0.05)


def _stale(store: Storage, holder: dict[str, Any] | None, path: str, announce: bool) -> str | None:
    """Why the lock's holder is gone, or None when it may be alive (`announce`: log a lease watch)."""
    if holder is None:
        try:
            age = time.time() - store.mtime(path)
        except FileNotFoundError:
            return "it was removed"
        return f"it holds no readable owner and is {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
    pid, host = holder.get("pid"), holder.get("host")
    who = f"pid {pid} on host {host} (holder since {holder.get('start_time')})"
    if host != socket.gethostname():
        return _gone_elsewhere(store, path, holder, who, announce)
    if not isinstance(pid, int) or pid <= 0:
        return None
    if pid == os.getpid():
        return f"{who} is this process, which does not hold it (left by an earlier process with this pid)"
    try:
        proc = psutil.Process(pid)
        zombie, started = proc.status() == psutil.STATUS_ZOMBIE, proc.create_time()
    except psutil.NoSuchProcess:
        return f"{who} is gone"
    except psutil.AccessDenied:
        return None  # alive, another user's
    if zombie:
        return f"{who} has exited (zombie)"
    since = _parse_time(holder.get("start_time"))
    if since is not None and started > since + 2.0:
        return f"{who} is gone: pid {pid} now belongs to a process started after the lock was taken"
    return None


def _gone_elsewhere(store: Storage, path: str, holder: dict[str, Any], who: str, announce: bool) -> str | None:
    """_stale for a holder on another host, whose processes cannot be checked from here: gone when it is this
    same job (restarted, so the holder was killed), or when it stops renewing its lease."""
    job = _job()
    if job is not None and holder.get("job") == job[1]:
        return (f"held by pid {holder.get('pid')} on host {holder.get('host')} of this same job ({job[0]}={job[1]}), "
                "which was restarted")
    lease = _lease_of(holder)
    return None if lease is None else _lease_lapsed(store, path, holder, who, lease, announce)


def _lease_of(holder: dict[str, Any]) -> float | None:
    """The holder's lease in seconds, clamped to _LEASE_RANGE_S; None when it records none (before leases)."""
    lease = holder.get("lease_s")
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not math.isfinite(lease):
        return None
    return min(max(float(lease), _LEASE_RANGE_S[0]), _LEASE_RANGE_S[1])


def _lease_lapsed(store: Storage, path: str, holder: dict[str, Any], who: str, lease: float,
                  announce: bool) -> str | None:
    """Watch the lock on this host's monotonic clock: why it is stale when nothing changes it for the lease
    plus a margin, None as soon as anything does (a renewal, a release, a new holder)."""
    limit = lease + _LEASE_MARGIN_S
    if announce:
        logger.warning("Waiting up to %.0f s for the save_dir lock held by pid %s on host %s to be renewed "
                       "(lease %g s); it is taken over if not", limit, holder.get("pid"), holder.get("host"), lease)
    first, start = _signature(store, path), time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(min(1.0, lease / 8))
        if _signature(store, path) != first:
            return None
    return f"{who} did not renew its lease ({lease:g} s) for {time.monotonic() - start:.0f} s"


def _signature(store: Storage, path: str) -> tuple:
    """What a renewal or a new holder changes: the content (read first: an open revalidates the attributes an
    NFS client caches) and the modification time."""
    raw = _read_raw(store, path)
    try:
        return raw, store.mtime(path)
    except FileNotFoundError:
        return None, None


def _parse_time(ts: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        return None


def _remove_if_unchanged(store: Storage, path: str, stale_raw: bytes) -> bool:
    """Remove the stale lock, under a guard, only if it still holds `stale_raw`. False: someone else is at it."""
    guard = path + ".takeover"
    if not store.create_exclusive(guard, b""):
        planted = _not_regular(store, guard)
        if planted in ("a symlink", "a directory"):  # removing it would fail, following it would be worse
            raise StorageError(f"the save_dir lock's takeover guard {guard} is {planted}; remove it (dcp-resume "
                               "creates it as an empty regular file)")
        try:
            if time.time() - store.mtime(guard) > _UNREADABLE_GRACE_S:
                store.remove_file(guard)  # left by a process that died mid-takeover
        except FileNotFoundError:
            pass
        return False
    try:
        if _read_raw(store, path) != stale_raw:
            return False
        store.remove_file(path)
        return True
    finally:
        store.remove_file(guard)


def _refusal(save_dir: str, path: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return (f"{save_dir} is locked by another writer: {path} was just created and holds no owner yet. "
                "One writer per save_dir: save elsewhere, or retry if that writer is gone")
    where = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('start_time')}")
    if holder.get("host") == socket.gethostname():
        alive, fix = "", ""
    elif _lease_of(holder) is not None:
        alive, fix = ", which renewed its lease while this job watched", ""
    else:
        alive, fix = "", f"; its host cannot be checked from here, so if that job is gone, remove {path}"
    return (f"{save_dir} is in use by another writer: {path} is held by {where}{alive}. One writer per save_dir: "
            f"stop that job or save to another save_dir{fix}")
