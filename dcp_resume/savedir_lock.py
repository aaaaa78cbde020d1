"""One writer per save_dir: `<save_dir>/.dcp-resume.lock`, taken by rank 0 at start_run() (or its first save),
released by close().

The lock file holds JSON {host, pid, start_time} and is created exclusively (O_CREAT|O_EXCL locally, a
conditional PUT with If-None-Match on S3), so of two processes creating it at once exactly one succeeds.
On fsspec backends without a conditional create it is check-then-write: best-effort. A second writer finds it and:
- refuses (SaveDirLockedError naming host, pid and since) while the holder is a live process, or runs on
  another host (whose processes cannot be checked from here);
- takes it over with a warning when the holder is gone: same host and the pid is not running, is a zombie,
  or now belongs to a process started after the lock was taken (pid reuse). A lock file with no readable
  content (its writer died between create and write) is stale once it is older than a few seconds.
A takeover removes the stale file under a short-lived `.takeover` guard, and only if it still holds the
stale content, so two processes taking over the same stale lock cannot both end up holding it.

Managers in one process share the lock (counted); the file goes when the last of them releases it.
Readers (find_latest_checkpoint, load_checkpoint, the CLI) never touch it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import weakref
from typing import Any

import psutil

from .errors import SaveDirLockedError
from .layout import utc_now_iso
from .logs import logger
from .storage import Storage

LOCK_FILE = ".dcp-resume.lock"
_UNREADABLE_GRACE_S = 5.0  # an empty/garbage lock younger than this may be mid-write by its creator

_held: dict[str, list] = {}  # lock path -> [count, content] for locks this process holds
_mutex = threading.Lock()


class SaveDirLock:
    """This manager's share of the lock; release() is idempotent."""

    def __init__(self, store: Storage, path: str):
        self.store, self.path = store, path
        self._released = False

    def release(self) -> None:
        with _mutex:
            if self._released:
                return
            self._released = True
            entry = _held.get(self.path)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _held[self.path]
            if _read(self.store, self.path) == entry[1]:  # still ours: not taken over or removed by hand
                self.store.remove_file(self.path)


def acquire(store: Storage, save_dir: str, owner: Any = None, wait_s: float = 0.0) -> SaveDirLock:
    """Take (or share, within this process) the save_dir's lock, or raise SaveDirLockedError. A live holder
    is waited for up to `wait_s` seconds (a short one, such as `dcp-resume prune`, is then let finish). With
    `owner`, the share is also released when the owner is garbage-collected or the interpreter exits unclosed."""
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        try:
            lock = _acquire(store, save_dir)
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
        weakref.finalize(owner, lock.release)
    return lock


def _acquire(store: Storage, save_dir: str) -> SaveDirLock:
    store.makedirs(save_dir)
    path = os.path.join(store.identity(save_dir), LOCK_FILE)
    with _mutex:
        entry = _held.get(path)
        if entry is not None and _read(store, path) == entry[1]:
            entry[0] += 1
            return SaveDirLock(store, path)
        for _ in range(100):
            mine = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": utc_now_iso()}
            if store.create_exclusive(path, (json.dumps(mine, sort_keys=True) + "\n").encode()):
                # (managers of this process whose file was removed meanwhile share the new one)
                _held[path] = [entry[0] + 1 if entry is not None else 1, mine]
                return SaveDirLock(store, path)
            holder, raw = _read_holder(store, path)
            if raw is None:
                continue  # released meanwhile: try again
            why = _stale(store, holder, path)
            if why is None:
                raise SaveDirLockedError(_refusal(save_dir, path, holder))
            if _remove_if_unchanged(store, path, raw):
                logger.warning("Taking over stale lock %s: %s", path, why)
            else:
                time.sleep(0.05)  # another process is taking it over: see who won
    raise SaveDirLockedError(f"{path}: could not take the lock after 100 tries; another process keeps "
                             "changing it")


def _read_raw(store: Storage, path: str) -> bytes | None:
    try:
        return store.read_bytes(path)
    except FileNotFoundError:
        return None


def _read(store: Storage, path: str) -> dict[str, Any] | None:
    raw = _read_raw(store, path)
    try:
        obj = json.loads(raw) if raw else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _read_holder(store: Storage, path: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """(parsed content or None, raw bytes or None when the file is gone), waiting briefly for a creator
    that has not written its content yet."""
    deadline = time.monotonic() + 0.5
    while True:
        raw = _read_raw(store, path)
        holder = _read(store, path) if raw else None
        if raw is None or holder is not None or time.monotonic() > deadline:
            return holder, raw
        time.sleep(0.05)


def _stale(store: Storage, holder: dict[str, Any] | None, path: str) -> str | None:
    """Why the lock's holder is gone, or None when it may be alive."""
    if holder is None:
        try:
            age = time.time() - store.mtime(path)
        except FileNotFoundError:
            return "it was removed"
        return f"it holds no readable owner and is {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
    pid, host = holder.get("pid"), holder.get("host")
    who = f"pid {pid} on host {host} (holder since {holder.get('start_time')})"
    if host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
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


def _parse_time(ts: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        return None


def _remove_if_unchanged(store: Storage, path: str, stale_raw: bytes) -> bool:
    """Remove the stale lock, under a guard, only if it still holds `stale_raw`. False: someone else is at it."""
    guard = path + ".takeover"
    if not store.create_exclusive(guard, b""):
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
    fix = ("stop that job or save to another save_dir" if holder.get("host") == socket.gethostname() else
           "stop that job or save to another save_dir; its host cannot be checked from here, so if that job "
           f"is gone, remove {path}")
    return f"{save_dir} is in use by another writer: {path} is held by {where}. One writer per save_dir: {fix}"
