"""The local filesystem backend: the default fast path (plain os calls, fsync, atomic rename)."""
from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import Any, BinaryIO, Iterable

import torch.distributed.checkpoint as dcp

from ..errors import StorageError
from .base import Storage

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_regular(path: str) -> int:
    """An fd for a regular file, never following a symlink and never blocking on a FIFO or device: a
    checkpoint's files may be anything (a FIFO would hang a reader, /dev/zero would exhaust memory)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (a FIFO, device or socket); refusing to read it")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular_for_writing(path: str, append: bool = False) -> int:
    """An fd to write a regular file at path (created if missing; truncated unless `append`), never through a
    symlink and never blocking on a FIFO: side files (the log, results, metadata.json's temp file) must not
    write outside save_dir because a link or a FIFO was planted there. OSError naming what is there otherwise."""
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a symlink, a FIFO without a reader, a directory
            raise OSError(e.errno, f"{path} is {_what_is(path)}, not a regular file; refusing to write through it "
                                   "(remove it: it is created as a regular file)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is {_what_is(path)}, not a regular file; refusing to write to it "
                                        "(remove it: it is created as a regular file)")
        os.set_blocking(fd, True)
        if not append:
            os.ftruncate(fd, 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _what_is(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    if stat.S_ISLNK(mode):
        return f"a symlink to {os.readlink(path)}"
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")


class LocalStorage(Storage):
    """A save_dir that is a plain path. Commits are temp file + fsync + rename + fsync of the directory."""

    def absolute(self, path: str) -> str:
        return os.path.abspath(path)

    def identity(self, path: str) -> str:
        return os.path.realpath(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_link(self, path: str) -> bool:
        return os.path.islink(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def listdir(self, path: str, dirs_only: bool = False) -> list[str]:
        """Names in a directory ([] when it does not exist); dirs_only: real directories, not symlinks to one."""
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not dirs_only or _is_real_dir(os.path.join(path, n)))

    def file_sizes(self, root: str) -> dict[str, int] | None:
        """Relative path -> size of every regular file under root, from one walk; None if root is not a real
        directory. Symlinks, FIFOs, devices and sockets are left out, so a checkpoint listing one is incomplete."""
        if not _is_real_dir(root):
            return None
        out = {}
        for dirpath, _, names in os.walk(root):  # os.walk does not descend into symlinked directories
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:  # removed while we walked
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[os.path.relpath(p, root)] = st.st_size
        return out

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_read(self, path: str) -> BinaryIO:
        """Plain unbuffered reads, not mmap: an I/O error on flaky storage must be an exception, not a SIGBUS.
        Regular files only (see _open_regular)."""
        return open(_open_regular(path), "rb", buffering=0)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, an OSError instead of reading more than limit bytes."""
        with open(_open_regular(path), "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise OSError(f"{path} is larger than {limit} bytes, which no file of this kind is: damage, "
                          "not read")
        return data

    def write_durably(self, path: str, data: bytes) -> None:
        """Write a file and fsync it; the caller fsyncs the directory once all files are in (sync_dir)."""
        with open(open_regular_for_writing(path), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> None:
        """write_durably for data that arrives in pieces (a large file, never all in memory)."""
        with open(open_regular_for_writing(path), "wb") as f:
            for chunk in chunks:
                f.write(chunk)
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

    def renew(self, path: str, data: bytes) -> None:
        """A new modification time for path (a lease's renewal), never through a symlink; `data`, what it
        holds, is needed only where a touch is a rewrite (object stores)."""
        os.utime(path, follow_symlinks=False)

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

    def link(self, src: str, dst: str) -> None:
        """dst becomes the same file as src (a hard link: no byte copied, the bytes live while either name
        does). Where the filesystem has no hard links, a durable copy."""
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(_open_regular(src), "rb") as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())

    def file_identity(self, path: str) -> tuple[int, int, int, int]:
        """(device, inode, size, mtime): hard links share all four (they are one copy of the bytes); a file that
        later reuses a freed inode number has another mtime."""
        st = os.lstat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def mtime(self, path: str) -> float:
        return os.path.getmtime(path)

    def free_bytes(self, path: str) -> int | None:
        """Free space on the filesystem holding path (or its nearest existing parent)."""
        path = os.path.abspath(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        return shutil.disk_usage(path).free

    def file_signature(self, root: str, rels: list[str]) -> tuple[Any, ...] | None:
        """(size, mtime, inode) of each file: changes whenever a file is rewritten. None if one is missing."""
        try:
            return tuple((rel, *_stat3(os.path.join(root, rel))) for rel in rels)
        except OSError:
            return None

    def check_reachable(self, path: str) -> None:
        """A local save_dir needs nothing up front: it is created at the first save."""

    def check_writable(self, save_dir: str) -> None:
        """StorageError naming save_dir unless it is (or can be created as) a writable directory."""
        if os.path.exists(save_dir) and not os.path.isdir(save_dir):
            raise StorageError(f"save_dir {save_dir} is a file, not a directory; pass a directory for the "
                               "checkpoints (it is created if missing)")
        try:
            os.makedirs(save_dir, exist_ok=True)
        except OSError as e:
            raise StorageError(f"save_dir {save_dir} cannot be created: {e.strerror or e}; pass a save_dir on a "
                               "writable filesystem") from None
        if not os.access(save_dir, os.W_OK):  # access() also says so for a read-only mount, even to root
            raise StorageError(f"save_dir {save_dir} is not writable (a read-only filesystem or no permission); "
                               "pass a save_dir on a writable filesystem")

    def dcp_writer(self, state_dir: str):
        """DCP's FileSystemWriter, fsyncing every file it writes."""
        return dcp.FileSystemWriter(state_dir, sync_files=True)

    def dcp_reader_class(self) -> tuple[type, dict[str, Any]]:
        return dcp.FileSystemReader, {}


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _stat3(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino
