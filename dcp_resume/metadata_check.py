"""Shape checks of an unpickled DCP `.metadata`, before anything trusts it.

The restricted unpickler (dcp_io) guarantees only that no code ran; the values may still be anything. A
crafted or damaged index could name a shard outside state/ (an absolute path, `../`), declare a tensor of
2^40 elements (a load would allocate it before reading a byte), or carry a string where DCP expects a
dtype or an int (tracebacks deep inside DCP). Every reader goes through dcp_io.read_metadata, which calls
`problem()` here and refuses what it names.

Tensor bytes are bounded by the bytes stored: DCP writes each chunk with torch.save (or raw, for the
safetensors layout), so a chunk's stored length is at least its element count times the element size,
and the chunks of one tensor cover it. Items whose bytes went through a stream transform (DCP's
compression extension, which dcp-resume never uses) are exempt from the length bound.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from .untrusted import is_count, is_dims


def _storage_problem(index: Any, info: Any) -> str | None:
    if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
        return f"an entry of storage_data is keyed by {type(index).__name__}, not a MetadataIndex"
    rel = getattr(info, "relative_path", None)
    if not isinstance(rel, str) or not rel:
        return f"item {index.fqn!r} names its file as {rel!r}, not a file name"
    if "/" in rel or "\\" in rel or rel in (".", "..") or "\0" in rel:
        return f"item {index.fqn!r} is stored in {rel!r}, outside state/ (DCP names its shards inside it)"
    if not (is_count(getattr(info, "offset", None)) and is_count(getattr(info, "length", None))):
        return f"item {index.fqn!r} has offset {getattr(info, 'offset', None)!r} and length " \
               f"{getattr(info, 'length', None)!r}; both must be integers >= 0"
    return None


def _tensor_problem(fqn: str, md: TensorStorageMetadata, stored_length: dict) -> str | None:
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return f"tensor {fqn!r} has dtype {dtype!r}, not a torch dtype"
    if not is_dims(md.size):
        return f"tensor {fqn!r} has size {md.size!r}, not a list of integers >= 0"
    chunks = md.chunks
    if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
        return f"tensor {fqn!r} has chunks of the wrong kind"
    covered, dims = 0, len(md.size)
    for chunk in chunks:
        offsets, sizes = chunk.offsets, chunk.sizes
        if not (is_dims(offsets) and is_dims(sizes) and len(offsets) == len(sizes) == dims
                and all(o + s <= d for o, s, d in zip(offsets, sizes, md.size))):
            return f"tensor {fqn!r} of size {list(md.size)} has a chunk at {offsets!r} of size " \
                   f"{sizes!r} that does not fit in it"
        numel = math.prod(sizes)
        covered += numel
        length = stored_length.get((fqn, tuple(offsets)))
        if length is not None and numel * dtype.itemsize > length:
            return f"tensor {fqn!r} declares a chunk of {list(sizes)} {dtype} ({numel * dtype.itemsize} bytes) " \
                   f"stored in only {length} bytes"
    if covered < math.prod(md.size):
        return f"tensor {fqn!r} of size {list(md.size)} ({math.prod(md.size)} elements) has chunks covering " \
               f"only {covered}"
    return None


def problem(meta: Metadata) -> str | None:
    """What makes this unpickled index unusable, or None."""
    storage_data, items = getattr(meta, "storage_data", None), getattr(meta, "state_dict_metadata", None)
    if not isinstance(storage_data, dict) or not isinstance(items, dict):
        return "storage_data or state_dict_metadata is not a mapping"
    stored_length = {}  # (fqn, chunk offsets) -> bytes stored, for chunks stored without a stream transform
    for index, info in storage_data.items():
        if (found := _storage_problem(index, info)) is not None:
            return found
        if isinstance(index.offset, (tuple, list)) and not getattr(info, "transform_descriptors", None):
            stored_length[(index.fqn, tuple(index.offset))] = info.length
    for fqn, md in items.items():
        if not isinstance(fqn, str):
            return f"an item is keyed by {type(fqn).__name__}, not a string"
        if isinstance(md, TensorStorageMetadata):
            if (found := _tensor_problem(fqn, md, stored_length)) is not None:
                return found
        elif not isinstance(md, BytesStorageMetadata):
            return f"item {fqn!r} is described by a {type(md).__name__}"
    planner = getattr(meta, "planner_data", None)
    if planner is not None and not isinstance(planner, dict):
        return f"planner_data is a {type(planner).__name__}, not a mapping"
    for fqn in items:
        path = (planner or {}).get(fqn, (fqn,))
        if not (isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path)):
            return f"item {fqn!r} has the nesting path {path!r} in planner_data, not a list of keys"
    return None
