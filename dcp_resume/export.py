"""Model weights out of a checkpoint into one safetensors (or torch.save) file: `dcp-resume export`.

Only the exported tensors are read: a flat template holding just those keys (full shapes, from DCP's metadata)
is filled by dcp_io.load, and DCP reassembles them from the shards of however many ranks wrote them (DDP,
FSDP2). So memory stays at the size of the exported weights, not of the training state (optimizer moments
are never read). The checkpoint must be complete and pass its content hashes first.

Names are plain parameter names: the state entry's own key (`model.`) goes, and so do wrapper parts
(`_orig_mod.` of torch.compile, `_fsdp_wrapped_module.` of FSDP1, `_checkpoint_wrapped_module.`) anywhere,
and `module.` of DDP/DataParallel at the front. (The engine already saves models by plain names; this covers
state dicts saved as they came out of a wrapped model.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from . import dcp_io, integrity, layout
from .errors import IncompleteCheckpointError
from .storage import Storage, open_storage

WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("safetensors", "torch")


class ExportError(ValueError):
    """Nothing to export: no such state entry, no tensors in it, or a prefix that matches none."""


@dataclass
class Exported:
    count: int
    nbytes: int
    dtypes: list[str]
    step: int


def plain_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS]
    while parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def select(meta: Metadata, where: str, state_key: str = "model", prefix: str | None = None,
           keep_prefix: bool = False) -> dict[str, str]:
    """Exported name -> saved DCP key, for the tensors of state[state_key] under `prefix` (a dotted
    component such as `encoder`, after plain_name). Names are relative to the prefix unless keep_prefix."""
    paths = dcp_io.saved_paths(meta)
    entries = sorted({str(p[0]) for p in paths.values()})
    if state_key not in entries:
        raise ExportError(f"{where} has no model weights under '{state_key}': its state holds "
                          f"{', '.join(entries) or 'nothing'}; pass --state-key NAME for the entry that holds them")
    chosen: dict[str, str] = {}
    for fqn, path in paths.items():
        if path[0] != state_key or not isinstance(meta.state_dict_metadata[fqn], TensorStorageMetadata):
            continue
        name = plain_name(".".join(map(str, path[1:])))
        if name in chosen:
            raise ExportError(f"{where}: saved keys {chosen[name]} and {fqn} both become {name!r} once wrapper "
                              "prefixes are removed; export them with --prefix one at a time")
        chosen[name] = fqn
    if not chosen:
        raise ExportError(f"{where} has no tensors under '{state_key}'; pass --state-key NAME for the entry "
                          "that holds the model weights")
    if prefix:
        stem = prefix.strip(".")
        matched = {n: f for n, f in chosen.items() if n.startswith(stem + ".")}
        if not matched:
            tops = sorted({n.split(".")[0] for n in chosen})
            raise ExportError(f"--prefix {prefix} matches none of the {len(chosen)} tensors of '{state_key}' in "
                              f"{where}; its components are: {', '.join(tops)}")
        chosen = matched if keep_prefix else {n[len(stem) + 1:]: f for n, f in matched.items()}
    return chosen


def read_tensors(store: Storage, state_dir: str, meta: Metadata, chosen: dict[str, str]) -> dict[str, torch.Tensor]:
    """Full CPU tensors for the chosen keys only (a flat template: DCP matches it by flattened key)."""
    template = {}
    for fqn in chosen.values():
        md = meta.state_dict_metadata[fqn]
        template[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp_io.load(store, template, state_dir, None)
    return {name: template[fqn] for name, fqn in sorted(chosen.items())}


def write_atomically(tensors: dict[str, torch.Tensor], out: str, fmt: str, metadata: dict[str, str]) -> None:
    """Temp file + fsync + rename: `out` is either absent/old or the whole new file."""
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except Exception as e:  # OSError (ENOSPC, EROFS), SafetensorError, torch.save's RuntimeError
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"could not write --out {out}: {detail}; nothing was written ({out} is as it was)") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    parent = os.path.dirname(os.path.abspath(out))
    open_storage(parent).sync_dir(parent)


def export(path: str, out: str, *, state_key: str = "model", prefix: str | None = None,
           keep_prefix: bool = False, dtype: str | None = None, fmt: str = "safetensors",
           store: Storage | None = None) -> Exported:
    """Write the model weights of checkpoint `path` to `out`; floating tensors cast to `dtype` if given.
    `store`: path's Storage when the caller has it (default: open_storage(path))."""
    store = open_storage(path) if store is None else store
    info = layout.inspect_dir(store, path)
    if not info.complete:
        raise IncompleteCheckpointError(f"{path} is not a complete checkpoint ({info.reason}); export a "
                                        "complete one (`dcp-resume ls <save_dir>` lists them)")
    integrity.check(store, info)
    state_dir = os.path.join(path, layout.STATE_DIR)
    meta = dcp_io.read_metadata(store, state_dir)
    tensors = read_tensors(store, state_dir, meta, select(meta, path, state_key, prefix, keep_prefix))
    if dtype is not None:
        for name, t in tensors.items():
            if t.is_floating_point():
                tensors[name] = t.to(DTYPES[dtype])
    write_atomically(tensors, out, fmt, {"format": "pt", "source": store.absolute(path),
                                         "step": str(info.step), "state_key": state_key, "prefix": prefix or ""})
    return Exported(len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()),
                    sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}), info.step)
