"""The one place that hands state to torch.distributed.checkpoint and reads its files back.

DCP's own key helpers (flatten/set_element, from compat.py with every other private torch name) name keys here,
so the engine's key checks agree with DCP by construction.

Nothing read from disk is unpickled without restriction (DCP itself does, in two places): `.metadata` goes
through `_MetadataUnpickler`, which admits only DCP's metadata classes, torch.Size, dtypes and plain values;
non-tensor items go through `torch.load(weights_only=True)` (`SafeLoadPlanner`). Tensors DCP already loads
with weights_only=True. A checkpoint holding anything else raises UnsafeCheckpointError before it runs.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import pathlib
import pickle
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as _dcp_metadata
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from . import compat, hashing, metadata_check
from .compat import flatten_state_dict, set_element
from .distributed import is_distributed
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .storage import Storage
from .verified_read import Expected, VerifiedRead

DCP_METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
METADATA_LIMIT = 2 << 30  # a .metadata past 2 GiB (millions of tensor chunks) is damage, not read into memory

__all__ = ["save", "load", "read_metadata", "write_metadata", "flat_keys", "flatten", "template_from_metadata",
           "saved_paths", "shard_files_of_rank"]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' single-process use even when told so with no_dist=True."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(store: Storage, state_dict: dict[str, Any], state_dir: str, group) -> dict[str, list[tuple[int, int]]]:
    """DCP's save; returns this rank's items as file name -> [(offset, length)], for their hashes."""
    writer = store.dcp_writer(state_dir)
    written = _record_items(writer)
    with _quiet_single_process():
        dcp.save(state_dict, storage_writer=writer, process_group=group, no_dist=not is_distributed())
    return written


def _record_items(writer) -> dict[str, list[tuple[int, int]]]:
    """Where each item the writer writes lands (DCP's own WriteResults), filled as its writes finish."""
    written: dict[str, list[tuple[int, int]]] = {}
    write_data = writer.write_data

    def recording(plan, planner):
        future = write_data(plan, planner)

        def record(done) -> None:
            try:
                results = done.value()
            except Exception:  # the write failed: DCP raises it; nothing to record
                return
            for result in results:
                where = result.storage_data
                written.setdefault(where.relative_path, []).append((where.offset, where.length))
        future.add_done_callback(record)
        return future
    writer.write_data = recording
    return written


def load(store: Storage, template: dict[str, Any], state_dir: str, group, expected: Expected | None = None,
         refusal: Exception | None = None) -> None:
    """Fills template in place (tensors copied into, other values replaced). With `expected`, every byte read is
    checked against metadata.json's hashes before it is used (verified_read.py). `refusal`: this rank's reason
    not to load (its template may be empty), raised in DCP's plan exchange, which hands it to every rank before
    any shard is read; every rank then raises the first failing rank's error."""
    reader = safe_reader(store, state_dir, expected)
    reader.refusal = refusal
    if refusal is not None:
        refusal.refused_before_reading = True  # travels with it (an exception pickles its __dict__)
    try:
        with _quiet_single_process():
            dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(reader),
                     process_group=group, no_dist=not is_distributed())
    except CheckpointException as e:  # DCP wraps every rank's error; a refusal is ours to report as is
        for exc, _ in e.failures.values():
            if isinstance(exc, (UnsafeCheckpointError, CorruptCheckpointError)) or getattr(
                    exc, "refused_before_reading", False):
                raise exc from None
        raise


def read_metadata(store: Storage, state_dir: str, expected: Expected | None = None, *, shared: bool = False
                  ) -> Metadata:
    """state_dir's DCP index, unpickled safely and checked (metadata_check). `shared`: the caller only reads it,
    so it may be the object an earlier shared read of the same bytes got (the newest is kept: a resume's
    discovery and its load parse and check the index once); forget_shared_index() drops it."""
    reader = safe_reader(store, state_dir, expected)
    reader.shared = shared
    return reader.read_metadata()


# The newest index read with shared=True, by (path, xxh3 of its bytes): the same bytes give the same checked
# object, so reusing it is as safe as parsing again. One entry: an index of a huge model is large.
_shared_index: dict[tuple[str, str], Metadata] = {}


def forget_shared_index() -> None:
    _shared_index.clear()


# -- loading without running code from the checkpoint ----------------------------------------------
_REFUSAL = ("that dcp-resume will not load: unpickling it could run code. This checkpoint was crafted or "
            "damaged, or written by a tool other than torch.distributed.checkpoint; do not load it (not with "
            "plain DCP either)")

# What a real DCP .metadata pickles (torch 2.6 .. 2.14): the metadata dataclasses, the filesystem
# _StorageInfo, torch.Size, dtypes/layouts (a global of `torch`, or torch.serialization._get_layout), the
# save path (a pathlib path) and plain containers.
_METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", n): getattr(_dcp_metadata, n) for n in (
    "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
    "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING") if hasattr(_dcp_metadata, n)}
_METADATA_CLASSES.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): compat.StorageInfo,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", t.__name__): t for t in (set, frozenset, complex, slice, range)},
})
if compat.get_layout is not None:  # how a torch.layout pickles (looks one up by name)
    _METADATA_CLASSES[("torch.serialization", "_get_layout")] = compat.get_layout
_PATH_CLASSES = {"Path", "PosixPath", "PurePath", "PurePosixPath", "PureWindowsPath", "WindowsPath"}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP .metadata needs; anything else raises UnsafeCheckpointError."""

    def __init__(self, file, where: str, size: int):
        super().__init__(file)
        self.where, self.size = where, size

    def _bytearray(self, *args: Any) -> bytearray:
        """bytearray(N) allocates N bytes: bounded by the file's own size, as real contents are."""
        if args and isinstance(args[0], int) and not 0 <= args[0] <= self.size:
            raise CorruptCheckpointError(f"{self.where} asks for a bytearray of {args[0]} bytes, more than the "
                                         f"file's {self.size}; the checkpoint is damaged: resume from another one")
        return bytearray(*args)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "bytearray"):
            return self._bytearray
        found = _METADATA_CLASSES.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            return getattr(pathlib, name)
        raise UnsafeCheckpointError(f"{self.where} holds a pickled object of type {module}.{name} {_REFUSAL}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.where} holds a pickled persistent reference (DCP metadata has "
                                    f"none) {_REFUSAL}")


class _SafeMetadata:
    """read_metadata that unpickles with _MetadataUnpickler instead of plain pickle (mixed into the store's DCP
    reader class by safe_reader), reading `.metadata` through the store: a regular file, bounded. Given
    `expected`, the index is hashed, and read once per load (DCP's own read_metadata gets the one the load's
    template was built from)."""

    store: Storage
    shared: bool = False  # see read_metadata(shared=)
    refusal: Exception | None = None  # see load(refusal=): DCP gets an empty index and the planner raises it

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.refusal is not None:  # the index may be what was refused: not read again
            return Metadata(state_dict_metadata={}, storage_data={}, storage_meta=StorageMeta())
        path = compat.metadata_path(self, kwargs.get("rank"))
        expected = getattr(self, "expected", None)
        if expected is not None and expected.index is not None and expected.index[0] == path:
            metadata = expected.index[1]  # read and checked earlier in this load (the template was built from it)
        else:
            metadata = self._read_checked(path, expected)
            if expected is not None:
                expected.index = (path, metadata)
        metadata.storage_meta.load_id = compat.reader_load_id(self)
        return metadata

    def _read_checked(self, path: str, expected: Expected | None) -> Metadata:
        data = self.store.read_bytes(path, limit=METADATA_LIMIT)  # a regular file, bounded, never a FIFO
        keyed_by = hashing.RECORDED  # the shared key's hash: usually the recorded one too
        digest = hashing.digest(data, keyed_by) if self.shared else None
        if expected is not None and expected.metadata is not None:
            algorithm, want = expected.metadata
            expected.count(len(data))
            got = digest if digest is not None and algorithm == keyed_by else hashing.digest(data, algorithm)
            if got != want:
                raise CorruptCheckpointError(f"{path} content hash mismatch ({algorithm} of the file is {got}, "
                                             f"metadata.json records {want}); resume from another checkpoint")
        key = (path, digest)
        if self.shared and key in _shared_index:
            return _shared_index[key]
        metadata = self._parse_checked(path, data)
        if self.shared:
            _shared_index.clear()
            _shared_index[key] = metadata
        return metadata

    @staticmethod
    def _parse_checked(path: str, data: bytes) -> Metadata:
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data), path, len(data)).load()
        except (UnsafeCheckpointError, CorruptCheckpointError):
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise CorruptCheckpointError(f"{path} is not a readable DCP .metadata ({type(e).__name__}: {e}); "
                                         "the checkpoint is damaged: resume from another one") from None
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; the "
                                         "checkpoint is damaged: resume from another one")
        if (found := metadata_check.problem(metadata)) is not None:
            raise CorruptCheckpointError(f"{path} is not a usable DCP .metadata: {found}; the checkpoint is "
                                         "damaged or crafted: resume from another one")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        return metadata


_SAFE_READERS: dict[type, type] = {}


def safe_reader(store: Storage, state_dir: str, expected: Expected | None = None):
    """The store's DCP reader for state_dir, with _SafeMetadata's read_metadata and, given `expected`,
    VerifiedRead's checked reads."""
    base, kwargs = store.dcp_reader_class()
    cls = _SAFE_READERS.setdefault(base, type(f"Safe{base.__name__}", (_SafeMetadata, VerifiedRead, base), {}))
    reader = cls(state_dir, **kwargs)
    reader.store, reader.expected = store, expected
    return reader


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with torch.load(weights_only=True): tensors and plain
    values (numbers, strings, bytes, None, lists, tuples, dicts, sets) plus what the application allowed
    with torch.serialization.add_safe_globals."""

    def __init__(self, reader, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._reader = reader

    def create_local_plan(self):
        if self._reader.refusal is not None:  # DCP gathers it to every rank (load's docstring)
            raise self._reader.refusal
        return super().create_local_plan()

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(self._refusal(read_item, value, e)) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def _refusal(self, read_item, value: io.BytesIO, error: Exception) -> str:
        try:
            value.seek(0)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(value) or ["an unknown type"]
        except Exception:  # not a torch.save archive: say what torch.load said
            names = [f"an unreadable kind ({str(error).strip().splitlines()[-1][:200]})"]
        info = compat.reader_storage_data(self._reader).get(read_item.storage_index)
        where = str(self._reader.path) if info is None else os.path.join(str(self._reader.path), info.relative_path)
        return (f"{where} holds a pickled object of type {', '.join(names)} (item {read_item.dest_index.fqn!r}) "
                f"{_REFUSAL}. Plain values and tensors load; a type you saved on purpose and trust can be allowed "
                "with torch.serialization.add_safe_globals")


def saved_paths(meta: Metadata) -> dict[str, tuple]:
    """Flattened key -> its path in the saved nested dict (path[0] is the top-level state key)."""
    planner = meta.planner_data or {}
    return {fqn: tuple(planner.get(fqn, (fqn,))) for fqn in meta.state_dict_metadata}


def flat_keys(value: dict[str, Any]) -> dict[str, Any]:
    """DCP's flattened view of a nested state dict: key -> leaf."""
    flat, _ = flatten_state_dict(value)
    return flat


def flatten(value: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(key -> leaf, key -> its path in the nested dict), as DCP flattens a state dict for saving."""
    return flatten_state_dict(value)


def write_metadata(store: Storage, state_dir: str, metadata: Metadata) -> None:
    """Replace state_dir's DCP index atomically (rank 0, before the commit), pickled as DCP pickles it."""
    store.commit_atomically(os.path.join(state_dir, DCP_METADATA), pickle.dumps(metadata))


def template_from_metadata(meta: Metadata, top_keys: set[str] | None, map_location,
                           under: tuple = ()) -> dict[str, Any]:
    """An empty nested dict shaped like the saved one (restricted to top_keys, the keys right below the
    path `under`): fresh tensors of the saved shape and dtype, None where DCP stored a pickled value."""
    template: dict[str, Any] = {}
    depth = len(under)
    for fqn, path in saved_paths(meta).items():
        if tuple(path[:depth]) != tuple(under) or len(path) <= depth:
            continue
        if top_keys is not None and path[depth] not in top_keys:
            continue
        md = meta.state_dict_metadata[fqn]
        leaf = (torch.empty(md.size, dtype=md.properties.dtype, device=map_location)
                if isinstance(md, TensorStorageMetadata) else None)
        set_element(template, path, leaf)
    return template


def shard_files_of_rank(store: Storage, state_dir: str, rank: int) -> list[str]:
    """Files this rank wrote into state/: DCP names them __<rank>_<n>.distcp; rank 0 also writes .metadata."""
    prefix = f"__{rank}_"
    names = [n for n in store.listdir(state_dir) if n.startswith(prefix) and n.endswith(SHARD_SUFFIX)]
    if rank == 0 and store.exists(os.path.join(state_dir, DCP_METADATA)):
        names.append(DCP_METADATA)
    return sorted(names)
