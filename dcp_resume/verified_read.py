"""DCP's read step, with every item's bytes checked against metadata.json as they are read: one read per byte.

A save records the hash of each DCP item's byte range (hashing.py, `xxh3_64_items`). Loading, reader threads
read the items of the shards this rank needs, in file order, hash each one and hand it on only if it matches;
DCP's own thread then deserializes it and copies it into the live tensor. So no unverified byte reaches a live
tensor, the bytes are read once (not hashed in a pass of their own and read again by DCP), hashing runs beside
deserializing, and the shards of one rank are read in parallel. Read-ahead is bounded (PREFETCH_BYTES) and goes into
buffers that are reused item after item (fresh memory costs more than the read), over which DCP deserializes.

A shard without item hashes (written before they existed) was hashed whole before the load (resume_check.py)
and is read here without a check; so is one carrying no hash this version knows (sizes only, as before).
A mismatch raises CorruptCheckpointError inside DCP's read step, which DCP reports to every rank: the ranks
fail, and fall back, together.
"""
from __future__ import annotations

import io
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from . import compat, hashing, saved_tensor
from .compat import narrow_tensor_by_index
from .errors import CorruptCheckpointError

# Read and verified, not yet deserialized (one larger item is still admitted alone). Small, so buffers come back
# for reuse soon: each fresh page costs a fault. At 4 ranks, 128 MB, minor faults per rank and load were ~42k with
# 64 MB, ~31k with 16 MB, ~27k for DCP's own read.
PREFETCH_BYTES = 16 << 20
READ_THREADS = 4  # shards read at once by one rank
_SLACK = 64 << 10  # a free buffer of up to 2n + _SLACK bytes serves an item of n bytes


@dataclass
class Expected:
    """What a load of one checkpoint may trust, from its metadata.json (file names relative to state/)."""

    state_dir: str
    items: dict[str, tuple[str, dict[tuple[int, int], str]]] = field(default_factory=dict)  # shard -> hashes
    trusted: set[str] = field(default_factory=set)  # shards hashed whole before the load, or size-checked only
    metadata: tuple[str, str] | None = None  # (algorithm, digest) of state/.metadata
    index: tuple[str, Any] | None = None  # (path, DCP Metadata) once read and checked: read once per load
    hashed_bytes: int = 0  # bytes this process hashed while loading
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, n: int) -> None:
        with self._lock:
            self.hashed_bytes += n

    def check(self, name: str, offset: int, length: int, data: bytes) -> None:
        if name in self.trusted:
            return
        where = f"state/{name}"
        if name not in self.items:
            raise CorruptCheckpointError(f"{self.state_dir}/{name} is read by DCP's index but has no hash in "
                                         "metadata.json; the checkpoint is damaged: resume from another one")
        algorithm, digests = self.items[name]
        want = digests.get((offset, length))
        if want is None:
            raise CorruptCheckpointError(f"{where} bytes {offset}..{offset + length} are not an item metadata.json "
                                         "records a hash for; the checkpoint is damaged: resume from another one")
        got = hashing.digest(data, algorithm)
        self.count(length)
        if got != want:
            raise CorruptCheckpointError(f"{where} content hash mismatch in bytes {offset}..{offset + length} "
                                         f"({algorithm} of those bytes is {got}, metadata.json records {want})")


class _Buffers:
    """Buffers for items read and verified but not yet delivered: at most `limit` bytes out (a larger item is
    admitted when none is out), each handed back after DCP's copy and reused. Reused memory is why: reading
    into fresh memory costs a page fault per page and bytearray's zero fill, more than the read itself."""

    def __init__(self, limit: int):
        self.limit, self.out, self.held, self.stopped = limit, 0, 0, False
        self.free: list[bytearray] = []
        self.cond = threading.Condition()

    def take(self, n: int) -> memoryview | None:
        """A buffer of n bytes; None once stopped."""
        with self.cond:
            while not self.stopped and self.out and self.out + n > self.limit:
                self.cond.wait()
            if self.stopped:
                return None
            self.out += n
            fits = [b for b in self.free if n <= len(b) <= 2 * n + _SLACK]  # a small item leaves big buffers be
            if fits:
                buf = min(fits, key=len)
                self.free.remove(buf)
                return memoryview(buf)[:n]
            self.free.sort(key=len)
            while len(self.free) > 1 and self.held + n > self.limit:  # make room, keeping the largest
                self.held -= len(self.free.pop(0))
            if self.free and self.held + n > self.limit and len(self.free[0]) < n:
                self.held -= len(self.free.pop())  # too small for this item too
            self.held += n
        return memoryview(bytearray(n))

    def give(self, view: memoryview) -> None:
        with self.cond:
            self.out -= len(view)
            self.free.append(view.obj)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.free.clear()
            self.cond.notify_all()


def _read_exact(f, offset: int, view: memoryview, path: str) -> None:
    f.seek(offset)
    got, length = 0, len(view)
    while got < length:  # an unbuffered read may return less; EOF means the file shrank
        n = f.readinto(view[got:])
        if not n:
            raise CorruptCheckpointError(f"{path} ends at byte {offset + got}, before the item DCP's index "
                                         f"places at {offset}..{offset + length}; resume from another checkpoint")
        got += n


class _BufferFile(io.RawIOBase):
    """A read-only file over a buffer, without the copy io.BytesIO makes of anything but `bytes`."""

    def __init__(self, data):
        self._view, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, into) -> int:
        got = self._view[self._pos:self._pos + len(into)]
        into[:len(got)] = got
        self._pos += len(got)
        return len(got)


def _tensor_in_place(data: memoryview) -> torch.Tensor:
    """The tensor torch.save wrote into `data`, its storage a view of `data` (no copy): saved_tensor's reader,
    else torch.load(mmap=True)'s own path over memory instead of a mapped file, else torch.load (a copy) if
    this torch's loader differs."""
    fast = saved_tensor.tensor_view(data)
    if fast is not None:
        return fast
    try:
        return compat.load_weights_only(data, _BufferFile(data))
    except (AttributeError, TypeError):  # a private function moved or changed: the public, copying way
        return torch.load(_BufferFile(data), map_location="cpu", weights_only=True)


class VerifiedRead:
    """Mixed into the store's DCP reader class (dcp_io.safe_reader). With `expected` set, read_data reads and
    checks the items itself; without, it is DCP's own."""

    store: Any
    expected: Expected | None = None

    def read_data(self, plan, planner) -> Future:
        if self.expected is None:
            return super().read_data(plan, planner)
        per_file: dict[str, list] = {}
        for item in plan.items:
            where = compat.reader_storage_data(self)[item.storage_index]
            per_file.setdefault(where.relative_path, []).append((where.offset, where.length, item, where))
        ready: queue.Queue = queue.Queue()
        buffers = _Buffers(PREFETCH_BYTES)
        names = iter(sorted(per_file))
        names_lock = threading.Lock()

        def next_name() -> str | None:
            with names_lock:
                return next(names, None)

        def produce() -> None:
            try:
                while (name := next_name()) is not None:
                    path = os.path.join(self.expected.state_dir, name)
                    with self.store.open_read(path) as f:
                        for offset, length, item, where in sorted(per_file[name], key=lambda r: r[0]):
                            data = buffers.take(length)
                            if data is None:
                                return
                            _read_exact(f, offset, data, path)
                            self.expected.check(name, offset, length, data)
                            ready.put((item, where, data))
            except BaseException as e:  # handed to DCP's thread, which raises it
                ready.put(e)

        threads = [threading.Thread(target=produce, name="dcp-resume-read", daemon=True)
                   for _ in range(min(READ_THREADS, len(per_file)))]
        for t in threads:
            t.start()
        try:
            for _ in range(len(plan.items)):
                got = ready.get()
                if isinstance(got, BaseException):
                    raise got
                item, where, data = got
                self._deliver(item, where, data, planner)
                buffers.give(data)
        finally:
            buffers.stop()
            for t in threads:
                t.join()
        done: Future = Future()
        done.set_result(None)
        return done

    def _deliver(self, item, where, data: memoryview, planner) -> None:
        """What DCP's read_data does with one item's bytes: load_bytes, or deserialize and copy into place."""
        descriptors = getattr(where, "transform_descriptors", None) or ()  # DCP's stream extensions (never ours)
        if item.type == LoadItemType.BYTE_IO:  # io.BytesIO copies: the planner may keep it, the buffer is reused
            stream = self.transforms.transform_load_stream(item, descriptors, io.BytesIO(data))
            planner.load_bytes(item, io.BytesIO(stream.read()) if descriptors else stream)
            return
        if descriptors:
            stream = self.transforms.transform_load_stream(item, descriptors, io.BytesIO(data))
            tensor = torch.load(stream if stream.seekable() else io.BytesIO(stream.read()), map_location="cpu",
                                weights_only=True)
        else:
            tensor = _tensor_in_place(data)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpointError(f"{self.expected.state_dir}: item {item.storage_index.fqn!r} holds a "
                                         f"tensor of size {tuple(tensor.size())} where DCP's index says "
                                         f"{tuple(target.size())}; resume from another checkpoint")
        target.copy_(tensor)
        planner.commit_tensor(item, target)
