"""The one place that hands state to torch.distributed.checkpoint and reads its files back.

Private DCP helpers used here (flatten/set_element) are the ones DCP itself uses to name keys, so the
engine's key checks agree with DCP by construction.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .distributed import is_distributed

DCP_METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"

__all__ = ["save", "load", "read_metadata", "flat_keys", "template_from_metadata", "saved_paths",
           "shard_files_of_rank"]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' single-process use even when told so with no_dist=True."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(state_dict: dict[str, Any], state_dir: str, group) -> None:
    with _quiet_single_process():
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(state_dir, sync_files=True),
                 process_group=group, no_dist=not is_distributed())


def load(template: dict[str, Any], state_dir: str, group) -> None:
    """Fills template in place (tensors copied into, other values replaced)."""
    with _quiet_single_process():
        dcp.load(template, storage_reader=dcp.FileSystemReader(state_dir), process_group=group,
                 no_dist=not is_distributed())


def read_metadata(state_dir: str) -> Metadata:
    return dcp.FileSystemReader(state_dir).read_metadata()


def saved_paths(meta: Metadata) -> dict[str, tuple]:
    """Flattened key -> its path in the saved nested dict (path[0] is the top-level state key)."""
    planner = meta.planner_data or {}
    return {fqn: tuple(planner.get(fqn, (fqn,))) for fqn in meta.state_dict_metadata}


def flat_keys(value: dict[str, Any]) -> dict[str, Any]:
    """DCP's flattened view of a nested state dict: key -> leaf."""
    flat, _ = flatten_state_dict(value)
    return flat


def template_from_metadata(meta: Metadata, top_keys: set[str] | None, map_location) -> dict[str, Any]:
    """An empty nested dict shaped like the saved one (restricted to top_keys): fresh tensors of the saved
    shape and dtype, None where DCP stored a pickled value."""
    template: dict[str, Any] = {}
    for fqn, path in saved_paths(meta).items():
        if top_keys is not None and path[0] not in top_keys:
            continue
        md = meta.state_dict_metadata[fqn]
        leaf = (torch.empty(md.size, dtype=md.properties.dtype, device=map_location)
                if isinstance(md, TensorStorageMetadata) else None)
        set_element(template, path, leaf)
    return template


def shard_files_of_rank(state_dir: str, rank: int) -> list[str]:
    """Files this rank wrote into state/: DCP names them __<rank>_<n>.distcp; rank 0 also writes .metadata."""
    prefix = f"__{rank}_"
    names = [n for n in os.listdir(state_dir) if n.startswith(prefix) and n.endswith(SHARD_SUFFIX)]
    if rank == 0 and os.path.exists(os.path.join(state_dir, DCP_METADATA)):
        names.append(DCP_METADATA)
    return sorted(names)
