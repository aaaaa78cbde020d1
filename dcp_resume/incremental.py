"""Checkpoints that cost only what changed: a tensor whose bytes match an earlier checkpoint of save_dir (the
base: link_source.py says which, and which of its files may be linked) is not written again. The new checkpoint
links the base's shard file that holds those bytes (a hard link locally, a server-side copy on an object store)
and its DCP index points there, so every checkpoint stays a complete directory that plain DCP reads, that copies
elsewhere on its own, and that retention can delete without touching the bytes other checkpoints share.

Decided by content, per flattened state key (`model.lm_llama.model.layers.0.mlp.up_proj.weight`): every rank
fingerprints its chunk of every tensor and compares it with the fingerprint the base recorded for that chunk; a
key is reused only when every rank holding it matched. A frozen tensor edited in place fails the comparison and
is written anew, whatever its requires_grad. Fingerprints are xxh3_64 of the bytes
for CPU tensors and a weighted 128-bit integer sum computed on the device for others (nothing is copied to
the host to decide); each records its algorithm, dtype and shape, and only equal strings match.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import xxhash
from torch.distributed.tensor import DTensor

from . import dcp_io, layout
from .compat import create_chunk_list
from .distributed import CommitGroup
from .storage import Storage

FINGERPRINTS = "fingerprints"  # metadata.json: "<key>@<chunk offsets>" -> "<algorithm>:<digest>:<dtype>:<shape>"
LINK_PREFIX = "ref."  # state/ref.<checkpoint>.<file>: a shard file of an earlier checkpoint, linked
_WORDS = 1 << 24  # int64 words per step of the device fingerprint (128 MiB): bounds its scratch memory
_M1, _M2 = -7046029254386353131, -4658895280553007687  # odd 64-bit multipliers (as signed int64)


@dataclasses.dataclass
class Source:
    """A checkpoint a save may link from (link_source.choose): its path and the fingerprints of the chunks it may
    link, "<key>@<chunk offsets>" -> fingerprint."""

    path: str
    fingerprints: dict[str, str]


@dataclasses.dataclass
class Reuse:
    """What one save takes from its base checkpoint (the same on every rank)."""

    base: str | None = None  # the base checkpoint's path, None: write everything
    keys: frozenset[str] = frozenset()  # flattened state keys stored by `base`, not written again
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)  # every rank's chunks, for metadata.json


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_key(fqn: str, t: torch.Tensor) -> str:
    """The key of this rank's chunk of `t` (DCP's own chunk: global offsets, zeros for a plain tensor)."""
    offsets = create_chunk_list(t)[0].offsets
    return f"{fqn}@{','.join(map(str, offsets))}"


def fingerprint(t: torch.Tensor) -> str:
    """'<algorithm>:<digest>:<dtype>:<shape>' of a tensor's bytes (a DTensor: this rank's shard)."""
    t = _local(t).detach()
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        digest = "xxh3_64:" + xxhash.xxh3_64(flat.numpy().data).hexdigest()
    else:
        digest = "wsum128:" + _device_digest(flat)
    return f"{digest}:{str(t.dtype).removeprefix('torch.')}:{','.join(map(str, t.shape))}"


def _device_digest(flat: torch.Tensor) -> str:
    """Two sums of the bytes as int64 words, each word times a position-dependent odd weight, wrapping mod
    2**64: computed where the tensor lives, exact and order-independent on any device (integer sums)."""
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:  # view(int64) needs whole, aligned words: a fresh copy has them
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    sums = [torch.zeros((), dtype=torch.int64, device=flat.device) for _ in range(2)]
    for start in range(0, words.numel(), _WORDS):
        part = words[start:start + _WORDS]
        index = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
        sums[0] += (part * (index * _M1 | 1)).sum()
        sums[1] += ((part ^ index) * (index * _M2 | 1)).sum()
    return "".join(f"{int(s) & (2**64 - 1):016x}" for s in sums)


def plan(flat: dict[str, torch.Tensor], source: Source | None, group: CommitGroup) -> Reuse:
    """Collective: which keys of `flat` (reusable(): this save's tensor leaves) are unchanged since `source`
    (rank 0's choice; None: write everything) on every rank that holds them."""
    keys = {fqn: chunk_key(fqn, t) for fqn, t in flat.items()}
    mine = {keys[fqn]: fingerprint(t) for fqn, t in flat.items()}
    shared = group.broadcast(None if source is None else (source.path, source.fingerprints))
    base_path, recorded = shared if shared is not None else (None, {})
    unchanged = {fqn for fqn, key in keys.items() if recorded.get(key) == mine[key]}
    changed = keys.keys() - unchanged
    everyone = group.all_gather((mine, unchanged, changed))
    fingerprints: dict[str, str] = {}
    reused: set[str] = set()
    vetoed: set[str] = set()
    for theirs, same, different in everyone:
        fingerprints.update(theirs)
        reused |= same
        vetoed |= different
    return Reuse(base_path if reused - vetoed else None, frozenset(reused - vetoed), fingerprints)


def without(payload: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """A copy of the nested payload without the leaves at the flattened `keys` that it holds (another rank's
    per-rank keys are not here); dicts are copied on the way down, nothing else. Leaves inside lists are never
    reused, so list indices never shift."""
    if not keys:
        return payload
    _, mappings = dcp_io.flatten(payload)
    out = dict(payload)
    for fqn in keys & mappings.keys():
        path, node = mappings[fqn], out
        for step in path[:-1]:
            node[step] = dict(node[step])
            node = node[step]
        del node[path[-1]]
    return out


def reusable(payload: dict[str, Any]) -> dict[str, Any]:
    """The flattened tensor leaves a save may take from an earlier checkpoint: reached through dicts only."""
    flat, mappings = dcp_io.flatten(payload)
    return {fqn: v for fqn, v in flat.items() if isinstance(v, torch.Tensor) and _dict_path(payload, mappings[fqn])}


def _dict_path(payload: dict[str, Any], path: tuple) -> bool:
    node = payload
    for step in path[:-1]:
        node = node[step]
        if not isinstance(node, dict):
            return False
    return True


def link_name(base: str, rel: str) -> str:
    """The name in the new state/ of `rel`, a file in `base`'s state/: kept when already a link."""
    return rel if rel.startswith(LINK_PREFIX) else f"{LINK_PREFIX}{Storage.basename(base)}.{rel}"


def merge_index(store: Storage, state_dir: str, reuse: Reuse) -> dict[str, dict]:
    """Rank 0, after DCP wrote the changed keys into state_dir: add the reused keys to its DCP index, their
    chunks pointing at links to the base's shard files, and make those links. A shard DCP wrote for a rank
    that had nothing left to write is referenced by no item: removed. Returns the links' metadata.json entries
    (size and content hash, as the base recorded them: the same bytes, so not read again)."""
    base_state = os.path.join(reuse.base, layout.STATE_DIR)
    new, old = dcp_io.read_metadata(store, state_dir), dcp_io.read_metadata(store, base_state)
    base_files = store.read_json(os.path.join(reuse.base, layout.METADATA_FILE))["files"]
    links: dict[str, str] = {}
    for fqn in reuse.keys:
        new.state_dict_metadata[fqn] = old.state_dict_metadata[fqn]
        new.planner_data[fqn] = old.planner_data[fqn]
    for index, where in old.storage_data.items():
        if index.fqn in reuse.keys:
            name = links.setdefault(where.relative_path, link_name(reuse.base, where.relative_path))
            new.storage_data[index] = dataclasses.replace(where, relative_path=name)
    entries = {}
    for rel, name in sorted(links.items()):
        store.link(os.path.join(base_state, rel), os.path.join(state_dir, name))
        entries[f"{layout.STATE_DIR}/{name}"] = dict(base_files[f"{layout.STATE_DIR}/{rel}"])
    dcp_io.write_metadata(store, state_dir, new)
    referenced = {where.relative_path for where in new.storage_data.values()}
    for name in store.listdir(state_dir):
        if name.endswith(dcp_io.SHARD_SUFFIX) and not name.startswith(LINK_PREFIX) and name not in referenced:
            store.remove_file(os.path.join(state_dir, name))
    return entries
