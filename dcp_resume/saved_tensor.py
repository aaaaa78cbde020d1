"""A tensor DCP wrote with torch.save, read back as a view of the bytes already in memory, without torch.load.

torch.load of one DCP item costs ~95 us here (a zip reader driven through Python file callbacks, then torch's
pure-Python weights-only unpickler): ~25 ms of each rank's CPU in a warm 4-rank load at 128 MB (268 items).
Such an item is a zip archive of stored (uncompressed) records: `data.pkl`, a pickle that calls
torch._utils._rebuild_tensor_v2 (v3 for dtypes without a legacy storage class) on one storage, and
`data/<key>`, that storage's bytes. `tensor_view` finds the records through the zip's central directory
(struct), checks data.pkl's opcodes and unpickles it with the C unpickler resolving only the few names such a
pickle holds (the rebuild functions resolve to recorders here, never to torch's code; once per distinct
pickle, as a model repeats few shapes), and returns torch.frombuffer over data/<key> with the recorded dtype,
size, stride and storage offset.

Anything else returns None and the caller uses torch.load (weights_only): compressed or zip64 records, a
big-endian archive, other opcodes, globals or persistent ids, backward hooks, sizes that do not add up. Where
both apply they give the same tensor (tests/unit/test_saved_tensor.py compares them over dtypes, shapes, strides).
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import sys
import warnings
from typing import Any, NamedTuple

import torch

from .compat import LegacyStorage
from .untrusted import is_count, is_dims

# The zip structures read (APPNOTE.TXT 4.3): local file header, central directory entry, end of central directory.
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # ..., name length, extra length (torch pads data with the extra)
_LOCAL_SIGNATURE = 0x04034B50
_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")  # ..., method, ..., sizes, lengths, ..., offset of the local header
_ENTRY_SIGNATURE = 0x02014B50
_END = struct.Struct("<IHHHHIIH")  # ..., entries, directory size, directory offset, comment length
_END_SIGNATURE = 0x06054B50
_ZIP64 = 0xFFFFFFFF  # a size or offset that only a zip64 record holds: left to torch.load


def _legacy_storage_dtypes() -> dict[str, torch.dtype]:
    """'FloatStorage' -> torch.float32, ... (the classes torch.save names for dtypes that have one)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation warning, on reading .dtype
        for name in dir(torch):
            cls = getattr(torch, name)
            if name.endswith("Storage") and isinstance(cls, type) \
                    and issubclass(cls, LegacyStorage) and not name.startswith("Q"):
                out[name] = cls.dtype
    return out


_TYPED = _legacy_storage_dtypes()


class _NotPlain(Exception):
    """Bytes this module leaves to torch.load."""


class _StorageKind(NamedTuple):
    dtype: torch.dtype | None  # None: UntypedStorage (its count is bytes, the dtype comes with the rebuild)


class _Storage(NamedTuple):
    key: str
    dtype: torch.dtype | None
    count: int  # elements of a typed storage, bytes of an untyped one


class _Rebuild(NamedTuple):
    storage: _Storage
    dtype: torch.dtype
    offset: Any
    size: Any
    stride: Any


def _v2(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> _Rebuild:
    if not isinstance(storage, _Storage) or storage.dtype is None or hooks or metadata:
        raise _NotPlain
    return _Rebuild(storage, storage.dtype, offset, size, stride)


def _v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> _Rebuild:
    if not isinstance(storage, _Storage) or storage.dtype is not None or not isinstance(dtype, torch.dtype) \
            or hooks or metadata:
        raise _NotPlain
    return _Rebuild(storage, dtype, offset, size, stride)


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _v2, ("torch._utils", "_rebuild_tensor_v3"): _v3,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch.storage", "UntypedStorage"): _StorageKind(None), ("torch", "UntypedStorage"): _StorageKind(None)}


# The opcodes a tensor's data.pkl is made of (protocol 2). Checked before the C unpickler runs, which trusts a memo
# index (LONG_BINPUT 2**28 would make it allocate gigabytes): BINPUT's index is one byte.
_OPCODES = {"PROTO", "GLOBAL", "BINPUT", "BINGET", "MARK", "BINUNICODE", "SHORT_BINUNICODE", "TUPLE", "TUPLE1",
            "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "BININT", "BININT1", "BININT2", "LONG1", "NEWFALSE", "NEWTRUE",
            "NONE", "BINPERSID", "REDUCE", "STOP"}
_PICKLE_LIMIT = 64 << 10  # a real one is ~150-200 bytes
_PLANS_KEPT = 4096
_plans: dict[bytes, "_Rebuild"] = {}  # data.pkl bytes -> what they say: a model repeats few shapes


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch":
            if name in _TYPED:
                return _StorageKind(_TYPED[name])
            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise _NotPlain

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)
                and isinstance(pid[2], str) and pid[3] == "cpu" and is_count(pid[4])):
            raise _NotPlain
        return _Storage(pid[2], pid[1].dtype, pid[4])


def _records(data: memoryview) -> dict[str, tuple[int, int]]:
    """Record name (without the archive's folder) -> (offset, length) in data, from the zip's central directory
    (torch streams its records: their local headers carry no sizes)."""
    end = len(data) - _END.size
    if end < 0:
        raise _NotPlain
    signature, _, _, _, count, dir_size, dir_at, comment = _END.unpack_from(data, end)
    if signature != _END_SIGNATURE or comment or dir_at == _ZIP64 or dir_at + dir_size > end:
        raise _NotPlain
    out: dict[str, tuple[int, int]] = {}
    pos = dir_at
    for _ in range(count):
        if pos + _ENTRY.size > end:
            raise _NotPlain
        (signature, _, _, _, method, _, _, _, stored, size, name_len, extra_len, comment_len, _, _, _,
         header_at) = _ENTRY.unpack_from(data, pos)
        if signature != _ENTRY_SIGNATURE or method != 0 or stored != size or _ZIP64 in (size, header_at) \
                or header_at + _LOCAL_HEADER.size > end:
            raise _NotPlain
        name = bytes(data[pos + _ENTRY.size:pos + _ENTRY.size + name_len]).decode("utf-8", "replace")
        local = _LOCAL_HEADER.unpack_from(data, header_at)
        start = header_at + _LOCAL_HEADER.size + local[-2] + local[-1]
        if local[0] != _LOCAL_SIGNATURE or start + size > dir_at:
            raise _NotPlain
        out[name.partition("/")[2]] = (start, size)
        pos += _ENTRY.size + name_len + extra_len + comment_len
    return out


def _plan(pickled: bytes) -> _Rebuild:
    """What a tensor's data.pkl says, unpickled once per distinct bytes (_NotPlain: not a plain tensor)."""
    plan = _plans.get(pickled)
    if plan is not None:
        return plan
    if len(pickled) > _PICKLE_LIMIT or any(op.name not in _OPCODES for op, _, _ in pickletools.genops(pickled)):
        raise _NotPlain
    plan = _Unpickler(io.BytesIO(pickled)).load()
    if not isinstance(plan, _Rebuild) or not (is_count(plan.offset) and is_dims(plan.size, tuple)
                                              and is_dims(plan.stride, tuple) and len(plan.size) == len(plan.stride)):
        raise _NotPlain
    if len(_plans) >= _PLANS_KEPT:
        _plans.clear()
    _plans[pickled] = plan
    return plan


def tensor_view(data: memoryview) -> torch.Tensor | None:
    """The CPU tensor torch.save wrote into `data` (a writable buffer), its storage a view of `data`; None where
    the bytes are not that plain layout (use torch.load)."""
    if sys.byteorder != "little":
        return None
    try:
        records = _records(data)
        if "data.pkl" not in records:
            raise _NotPlain
        if "byteorder" in records:  # absent in archives older than the record: little-endian
            at, n = records["byteorder"]
            if bytes(data[at:at + n]) != b"little":
                raise _NotPlain
        at, n = records["data.pkl"]
        plan = _plan(bytes(data[at:at + n]))
        at, n = records.get(f"data/{plan.storage.key}", (0, -1))
        itemsize = plan.dtype.itemsize
        if n != plan.storage.count * (itemsize if plan.storage.dtype is not None else 1) or n % itemsize:
            raise _NotPlain
        flat = torch.frombuffer(data, dtype=torch.uint8, count=n, offset=at) if n else torch.empty(0, dtype=torch.uint8)
        return flat.view(plan.dtype).as_strided(plan.size, plan.stride, plan.offset)
    except (_NotPlain, pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, RuntimeError):
        return None
