"""State that differs per rank: saved by each rank and given back to the rank that saved it.

DCP keeps one copy of a key that several ranks save, which is right for replicated weights and wrong for a
data loader's position or an RNG stream (every rank would get rank 0's back). So before a save the ranks
compare a digest of each entry of `state` that is not a model or optimizer. An entry that differs on some rank,
or that is per rank by nature (a data loader, whose position is its rank's share of the data even when the
numbers agree, or an object with `checkpoint_per_rank = True`), is written by every rank under
`__per_rank__/rank<r>/<key>`; the rest are written once, as before. Models and optimizers never go here: DCP
deduplicates and reshards them.

On load at the saving world size each rank reads its own copy. At another world size a per-rank entry has no
owner. A data loader whose batch sampler is a `ResumableSampler` is resharded: its sampler takes the global
position rank 0 saved, and the loader starts from there. An object with `fresh_on_resize = True` (RNGState) is
left as constructed, with a warning. Any other per-rank entry is refused with a message
naming it (`per_rank_policy="refuse"`, the default), or left as constructed with a warning
(`per_rank_policy="fresh"`).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from .dcp_io import flat_keys
from .errors import CheckpointMismatchError
from .sampler import ResumableSampler

PER_RANK_KEY = "__per_rank__"
POLICIES = ("refuse", "fresh")


def slot(rank: int) -> str:
    return f"rank{rank}"


def validate_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"per_rank_policy={policy!r} must be one of {', '.join(map(repr, POLICIES))}")


def is_data_loader(obj: Any) -> bool:
    return isinstance(obj, DataLoader)


def per_rank_by_nature(obj: Any) -> bool:
    """Saved per rank even when every rank's copy agrees: data loaders, and objects that say so with a
    true `checkpoint_per_rank` attribute (RNGState), so that a resume at another world size cannot hand
    one rank's position or stream to several."""
    return is_data_loader(obj) or getattr(obj, "checkpoint_per_rank", False) is True


def digest(value: Any) -> str | None:
    """A content hash of a state entry (tensors by dtype, shape and bytes; other leaves pickled), or None for
    sharded (DTensor) entries, which DCP handles itself."""
    h = xxhash.xxh3_64()
    for fqn, leaf in sorted(flat_keys({"v": value}).items()):
        h.update(fqn.encode())
        if isinstance(leaf, DTensor):
            return None
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(leaf.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())  # hashed in place, no copy
        else:
            try:
                h.update(pickle.dumps(leaf, protocol=4))
            except Exception:  # an unpicklable leaf: DCP will say so when it saves
                h.update(repr(leaf).encode())
    return h.hexdigest()


def place(entries: dict[str, Any], objects: dict[str, Any], group, rank: int, world: int) -> dict[str, Any]:
    """Save side, collective: `entries` (key -> what would be saved) with the per-rank ones moved under
    PER_RANK_KEY/rank<r>. `objects` are the live objects, to tell data loaders by type. Alone (world 1) there
    is nothing to compare, so nothing is hashed."""
    forced = {k for k, obj in objects.items() if per_rank_by_nature(obj)}
    differing: set[str] = set()
    if world > 1:
        mine = {k: digest(v) for k, v in entries.items() if k not in forced}
        everyone = group.all_gather(mine)
        differing = {k for k, d in mine.items() if d is not None and any(other.get(k) != d for other in everyone)}
    per_rank = forced | differing
    out = {k: v for k, v in entries.items() if k not in per_rank}
    if per_rank:
        out[PER_RANK_KEY] = {slot(rank): {k: entries[k] for k in sorted(per_rank)}}
    return out


def saved_owners(paths: dict[str, tuple]) -> dict[str, set[int]]:
    """Load side: per-rank key -> the ranks that saved it, from DCP's saved paths."""
    owners: dict[str, set[int]] = {}
    for path in paths.values():
        name = str(path[1]) if len(path) >= 3 and path[0] == PER_RANK_KEY else ""
        if name.startswith("rank") and name[4:].isdigit():  # anything else is no rank's slot: ignored
            owners.setdefault(str(path[2]), set()).add(int(name[4:]))
    return owners


def _resharding_sampler(obj: Any) -> ResumableSampler | None:
    sampler = getattr(obj, "batch_sampler", None) if is_data_loader(obj) else None
    return sampler if isinstance(sampler, ResumableSampler) else None


@dataclass
class Plan:
    """Which slot each per-rank key is read from on this rank, and what cannot be restored."""

    read: dict[str, str] = field(default_factory=dict)  # key -> slot to read
    resharded: list[str] = field(default_factory=list)  # loaders whose ResumableSampler takes rank 0's position
    fresh: list[str] = field(default_factory=list)  # left as constructed (per_rank_policy="fresh")


def plan(objects: dict[str, Any], owners: dict[str, set[int]], saved_world: int, rank: int, world: int,
         policy: str) -> Plan:
    """Decide, before anything is read, where each per-rank key comes from; refuse per policy."""
    out, unowned = Plan(), []
    for key, obj in objects.items():
        ranks = owners.get(key)
        if ranks is None:
            continue
        if saved_world == world and rank in ranks:
            out.read[key] = slot(rank)
        elif _resharding_sampler(obj) is not None and 0 in ranks:
            out.read[key] = slot(0)
            out.resharded.append(key)
        elif getattr(obj, "fresh_on_resize", False) is True:  # RNG streams: the process's own seeding stands
            out.fresh.append(key)
        else:
            unowned.append(key)
    if unowned and policy == "refuse":
        raise CheckpointMismatchError(_refusal(unowned, objects, owners, saved_world, world))
    out.fresh += unowned
    return out


def _refusal(keys: list[str], objects: dict[str, Any], owners: dict[str, set[int]], saved_world: int,
             world: int) -> str:
    lines = []
    for key in keys:
        obj = objects[key]
        why = ("a data loader: its position is its rank's share of the data" if is_data_loader(obj)
               else "its class sets checkpoint_per_rank" if per_rank_by_nature(obj) else "it differed between ranks")
        lines.append(f"  state[{key!r}] was saved separately by each of {len(owners[key])} ranks ({why})")
    return (f"checkpoint was saved at world size {saved_world} and this run has {world} ranks; per-rank state "
            "cannot be resharded:\n" + "\n".join(lines) + f"\nResume with {saved_world} ranks; or, for a data "
            "loader, give it a dcp_resume.ResumableSampler as batch_sampler (its position is global and "
            "reshards); or pass per_rank_policy='fresh' to load_checkpoint to keep these objects as constructed "
            "(a loader then restarts its epoch: samples repeat or are skipped)")


def finish(p: Plan, objects: dict[str, Any], loaded: dict[str, Any]) -> None:
    """After dcp.load: move each key's slot into loaded[key]; reshard loaders (restoring their sampler now,
    so the live loader is not given another rank's position)."""
    slots = loaded.pop(PER_RANK_KEY, {})
    for key, name in p.read.items():
        value = slots[name][key]
        if key in p.resharded:
            _resharding_sampler(objects[key]).load_state_dict(_find_index_sampler_state(value, key))
        else:
            loaded[key] = value


def _find_index_sampler_state(state: Any, key: str) -> dict:
    """The sampler position inside a (torchdata StatefulDataLoader) state dict."""
    if isinstance(state, dict):
        if isinstance(state.get("_index_sampler_state"), dict):
            return state["_index_sampler_state"]
        for value in state.values():
            try:
                return _find_index_sampler_state(value, key)
            except CheckpointMismatchError:
                pass
    raise CheckpointMismatchError(f"state[{key!r}] holds no sampler position (_index_sampler_state) to reshard; "
                                  "resume at the saving world size or with per_rank_policy='fresh'")
