"""Turning the user's `state` dict into what DCP saves, and restoring it in place on load.

Live models and optimizers go through torch.distributed.checkpoint.state_dict, so keys carry no
`module.`, `_orig_mod.` or FSDP prefixes and FSDP2 shards stay sharded (DTensor). Other objects with
state_dict()/load_state_dict() (schedulers, loaders) and plain values are saved as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import dcp_io, ddp, per_rank
from .errors import CheckpointMismatchError

_SHOW = 8  # keys listed per category in a mismatch error


def _unwrap_optimizer(opt: Any) -> Any:
    """accelerate's AcceleratedOptimizer (an Optimizer subclass) keeps the real one in `.optimizer`.
    Schedulers also have `.optimizer`, so only optimizers are unwrapped."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)) \
        and not isinstance(obj, (dict, torch.Tensor))


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def _check_str_keys(value: Any, where: str) -> None:
    """DCP flattens nested dicts into dotted string keys, so a non-string key would come back as a
    string and silently break the restore (e.g. a raw optimizer.state_dict() keyed by param index)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                hint = (" Pass the optimizer object itself, e.g. state={'optimizer': optimizer}, so its "
                        "state is saved by parameter name." if isinstance(k, int) and "state" in where else "")
                raise TypeError(f"{where} has the non-string key {k!r}; checkpoint dict keys must be "
                                f"strings.{hint}")
            _check_str_keys(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_str_keys(v, f"{where}[{i}]")


@dataclass
class LiveState:
    """The user's state dict sorted by how each entry is saved and restored."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, tuple[torch.optim.Optimizer, nn.Module]] = field(default_factory=dict)
    statefuls: dict[str, Any] = field(default_factory=dict)
    plain: dict[str, Any] = field(default_factory=dict)


def _model_for(key: str, opt: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    wanted = {id(p) for g in opt.param_groups for p in g["params"]}
    owners = {k: m for k, m in modules.items() if wanted & {id(p) for p in m.parameters()}}
    covered = {id(p) for m in owners.values() for p in m.parameters()}
    if not owners or not wanted <= covered:
        raise ValueError(f"state[{key!r}] is an optimizer, but no nn.Module in state holds all of its "
                         "parameters; add the model to state, e.g. {'model': model, "
                         f"'{key}': optimizer}}, so optimizer state is saved by parameter name")
    return next(iter(owners.values())) if len(owners) == 1 else nn.ModuleDict(owners)


def split(state: dict[str, Any]) -> LiveState:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of name -> model/optimizer/object/value, got {type(state).__name__}")
    live = LiveState()
    for key, obj in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state key {key!r} must be a string")
        if isinstance(obj, nn.Module):
            live.modules[key] = obj
        elif isinstance(obj, torch.optim.Optimizer):
            live.optimizers[key] = (_unwrap_optimizer(obj), None)  # model found below
        elif _is_stateful(obj):
            live.statefuls[key] = obj
        else:
            live.plain[key] = obj
    for key, (opt, _) in live.optimizers.items():
        live.optimizers[key] = (opt, _model_for(key, opt, live.modules))
    return live


def _model_and_optimizer_state(live: LiveState) -> dict[str, Any]:
    """Models and optimizers through torch.distributed.checkpoint.state_dict (plain FQNs, DTensor shards)."""
    out = {key: get_model_state_dict(module) for key, module in live.modules.items()}
    out.update({key: get_optimizer_state_dict(module, opt) for key, (opt, module) in live.optimizers.items()})
    return out


def to_save(state: dict[str, Any], group, rank: int, world: int) -> dict[str, Any]:
    """The nested dict handed to dcp.save (collective: ranks compare which entries differ per rank)."""
    if per_rank.PER_RANK_KEY in state:
        raise ValueError(f"state key {per_rank.PER_RANK_KEY!r} is reserved for per-rank state; rename it")
    live = split(state)
    ddp.warn_if_inexact(live.modules)
    out = _model_and_optimizer_state(live)
    entries = {key: obj.state_dict() for key, obj in live.statefuls.items()}
    entries.update(live.plain)
    for key, value in entries.items():
        _check_str_keys(value, f"state[{key!r}]")
    out.update(per_rank.place(entries, {**live.statefuls, **live.plain}, group, rank, world))
    return out


def _mismatch_lines(key: str, expected: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    lines = []
    if missing:
        lines.append(f"  state[{key!r}] missing from checkpoint ({len(missing)}): {', '.join(missing[:_SHOW])}"
                     + (" ..." if len(missing) > _SHOW else ""))
    if unexpected:
        lines.append(f"  state[{key!r}] unexpected in checkpoint ({len(unexpected)}): "
                     f"{', '.join(unexpected[:_SHOW])}" + (" ..." if len(unexpected) > _SHOW else ""))
    for k in sorted(expected.keys() & saved.keys()):
        md, leaf = saved[k], expected[k]
        if isinstance(md, TensorStorageMetadata) and isinstance(leaf, torch.Tensor) \
                and tuple(md.size) != tuple(leaf.shape):
            lines.append(f"  state[{key!r}] shape mismatch at {k}: checkpoint {list(md.size)}, "
                         f"live {list(leaf.shape)}")
    return lines


def build_template(live: LiveState, meta: Metadata, map_location, *, saved_world: int, rank: int, world: int,
                   per_rank_policy: str = "refuse") -> tuple[dict[str, Any], per_rank.Plan]:
    """What dcp.load fills: live objects' own state dicts (so sharding and device follow the live
    model), the saved structure for everything else, and this rank's slot of per-rank entries. Raises
    CheckpointMismatchError listing every missing, unexpected or reshaped key, or per-rank state that
    cannot follow a world-size change, before any tensor is read."""
    paths = dcp_io.saved_paths(meta)
    saved_by_top: dict[str, dict[str, Any]] = {}
    for fqn, path in paths.items():
        saved_by_top.setdefault(path[0], {})[fqn] = meta.state_dict_metadata[fqn]
    others = {**live.statefuls, **live.plain}
    owners = per_rank.saved_owners(paths)
    rank_plan = per_rank.plan({k: v for k, v in others.items() if k not in saved_by_top}, owners, saved_world,
                              rank, world, per_rank_policy)

    template = _model_and_optimizer_state(live)
    for key, value in live.plain.items():
        if _has_tensor(value) and key in saved_by_top:
            template[key] = value  # a dict of tensors: loaded in place, like plain DCP
    from_meta = {k for k in others if k in saved_by_top} - template.keys()
    template.update(dcp_io.template_from_metadata(meta, from_meta, map_location))
    for key, name in rank_plan.read.items():  # this rank's copy of per-rank entries, under their slot
        slot = template.setdefault(per_rank.PER_RANK_KEY, {}).setdefault(name, {})
        if key in live.plain and _has_tensor(live.plain[key]) and key not in rank_plan.resharded:
            slot[key] = live.plain[key]
        else:
            saved = dcp_io.template_from_metadata(meta, {key}, map_location, under=(per_rank.PER_RANK_KEY, name))
            slot.update(saved[per_rank.PER_RANK_KEY][name])

    problems = []
    every_key = list(live.modules) + list(live.optimizers) + list(others)
    absent = [k for k in every_key if k not in saved_by_top and k not in owners and not _empty_dict(others.get(k))]
    if absent:
        held = sorted((saved_by_top.keys() - {per_rank.PER_RANK_KEY}) | owners.keys())
        problems.append(f"  top-level keys missing from checkpoint: {', '.join(absent)} "
                        f"(it holds: {', '.join(held) or 'nothing'})")
    for key in template.keys() - from_meta - {per_rank.PER_RANK_KEY}:
        if key in saved_by_top:
            problems += _mismatch_lines(key, dcp_io.flat_keys({key: template[key]}), saved_by_top[key])
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the live objects:\n" + "\n".join(problems))
    for key in every_key:
        if key not in template and key not in owners and _empty_dict(live.plain.get(key)):
            template[key] = {}  # DCP stores no leaf for an empty dict
    return template, rank_plan


def _empty_dict(value: Any) -> bool:
    return isinstance(value, dict) and not value


def restore(live: LiveState, loaded: dict[str, Any], rank_plan: per_rank.Plan) -> None:
    """Push the loaded state dicts into the live objects (per-rank entries from this rank's slot; those
    left fresh by per_rank_policy are not touched)."""
    per_rank.finish(rank_plan, {**live.statefuls, **live.plain}, loaded)
    for key, module in live.modules.items():
        set_model_state_dict(module, loaded[key])
    for key, (opt, module) in live.optimizers.items():
        set_optimizer_state_dict(module, opt, loaded[key])
    for key, obj in live.statefuls.items():
        if key in loaded:
            obj.load_state_dict(loaded[key])
