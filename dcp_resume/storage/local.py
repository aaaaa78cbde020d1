"""The local filesystem backend: the default fast path (plain os calls, fsync, atomic rename)."""
from __future__ import annotations

import os
import shutil
from typing import Any, BinaryIO

_CHUNK = 4 << 20


class LocalBackend:
    """A save_dir that is a plain path. Commits are temp file + fsync + rename + fsync of the directory."""

    def identity(self, path: str) -> str:
        return os.path.realpath(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def listdir(self, path: str, dirs_only: bool = False) -> list[str]:
        """Names in a directory ([] when it does not exist)."""
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not dirs_only or os.path.isdir(os.path.join(path, n)))

    def file_sizes(self, root: str) -> dict[str, int] | None:
        """Relative path -> size of every regular file under root, from one walk; None if root is not a directory."""
        if not os.path.isdir(root):
            return None
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    out[os.path.relpath(p, root)] = os.path.getsize(p)
                except FileNotFoundError:  # removed while we walked
                    pass
        return out

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_read(self, path: str) -> BinaryIO:
        """Plain unbuffered reads, not mmap: an I/O error on flaky storage must be an exception, not a SIGBUS."""
        return open(path, "rb", buffering=0)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_durably(self, path: str, data: bytes) -> None:
        """Write a file and fsync it; the caller fsyncs the directory once all files are in (sync_dir)."""
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit_atomically(self, path: str, data: bytes) -> None:
        """Temp file + fsync + rename + fsync of the directory: readers see the old file or the new one."""
        tmp = path + ".tmp"
        self.write_durably(tmp, data)
        os.replace(tmp, path)
        self.sync_dir(os.path.dirname(os.path.abspath(path)))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path holding data unless it exists (O_CREAT|O_EXCL: of two creators exactly one wins).
        Create and write are two steps here: a reader may briefly see the file empty."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def sync_dir(self, path: str) -> None:
        """Make a directory's entries (new, renamed or removed files) durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(parent):
            self.sync_dir(parent)

    def remove_file(self, path: str) -> None:
        os.unlink(path)

    def mtime(self, path: str) -> float:
        return os.path.getmtime(path)

    def free_bytes(self, path: str) -> int | None:
        """Free space on the filesystem holding path (or its nearest existing parent)."""
        path = os.path.abspath(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        return shutil.disk_usage(path).free

    def signature(self, root: str, rels: list[str]) -> tuple[Any, ...] | None:
        """(size, mtime, inode) of each file: changes whenever a file is rewritten. None if one is missing."""
        try:
            return tuple((rel, *_stat3(os.path.join(root, rel))) for rel in rels)
        except OSError:
            return None

    def check_reachable(self, path: str) -> None:
        """A local save_dir needs nothing up front: it is created at the first save."""


def _stat3(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino
