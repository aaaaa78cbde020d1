"""Every private torch name the engine uses, in one module: what each is for, and what a load or save depends on.

Checked against torch 2.13.0 (CPU build) by the whole test suite, 2.14.1 (a CUDA build, on CPU) by the fast
tier in CI, and the floor, 2.9.1, by hand (pyproject.toml). 2.7 and 2.8 lack FileSystemReader._get_metadata_path.
A release that moves one of these breaks here, by name, at import, not deep inside a save; the rest of the
package imports them from here only (tests/unit/test_layering.py checks).

- DCP's own key flattening (`_nested_dict`, `_traverse`): the engine names keys exactly as DCP does, so its key
  checks and templates agree with DCP by construction.
- `_StorageInfo`: where an item lies in a shard, as DCP's index pickles it (the safe unpickler admits it).
- `_create_chunk_list`: DCP's chunk of a tensor on this rank (incremental saves key fingerprints by it).
- `_fsspec_filesystem`: DCP's reader and writer for fsspec URLs.
- `narrow_tensor_by_index`: DCP's copy of a loaded chunk into the live tensor.
- torch.serialization's zip reader and `_load`, with `_weights_only_unpickler`: a verified item is deserialized
  over the buffer it was read into (torch.load would copy it), with the checks torch.load(weights_only=True)
  gives it on this version (`load_weights_only`).
- `_LegacyStorage`, `_get_layout`: how saved tensors and layouts name their types in a pickle.
- The DCP reader's state (`_get_metadata_path`, `storage_data`, `load_id`): the verified reader is mixed into
  the store's DCP reader class and works with it.

Names that are format, not API, stay where they are read: the pickle globals torch.save writes for a tensor
(`torch._utils._rebuild_tensor_v2`, matched as strings by saved_tensor.py, which calls none of them) and the
classes a DCP `.metadata` pickles (dcp_io's allowlist).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import _weights_only_unpickler
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list as create_chunk_list

__all__ = ["FsspecReader", "FsspecWriter", "LegacyStorage", "StorageInfo", "create_chunk_list", "flatten_state_dict",
           "get_layout", "load_weights_only", "metadata_path", "narrow_tensor_by_index", "reader_load_id",
           "reader_storage_data", "set_element", "unflatten_state_dict"]

LegacyStorage = torch.storage._LegacyStorage  # typed storages (FloatStorage, ...) that saved tensors name
get_layout = getattr(torch.serialization, "_get_layout", None)  # how a torch.layout pickles (by name)

# torch.serialization._load takes weights_only from 2.14 on, which runs the weights_only checks torch.load
# runs (sparse tensors' indices validated); before, torch.load ran the same checks without being told.
_LOAD_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.serialization._load).parameters


def load_weights_only(data, file) -> Any:
    """What torch.load(file, map_location="cpu", weights_only=True) returns for the torch.save archive `data`
    (a buffer; `file`, a readable file over it), its storages being views of `data`, not copies."""
    extra = {"weights_only": True} if _LOAD_TAKES_WEIGHTS_ONLY else {}
    with torch.serialization._open_zipfile_reader(file) as archive:
        storage = torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
        return torch.serialization._load(archive, "cpu", _weights_only_unpickler, overall_storage=storage,
                                         encoding="utf-8", **extra)


def metadata_path(reader, rank: int | None) -> str:
    """Where a DCP reader reads its index (`.metadata`, or a rank's own file where DCP writes several)."""
    return str(reader._get_metadata_path(rank))


def reader_storage_data(reader) -> dict:
    """The reader's item -> where it lies (set by DCP's set_up_storage_reader)."""
    return reader.storage_data


def reader_load_id(reader) -> str:
    """The id DCP gave this load (a fresh index carries it)."""
    return reader.load_id


