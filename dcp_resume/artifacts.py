"""extra_artifacts: model-only exports and side files written by rank 0 next to state/ before the commit."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .layout import RESERVED_NAMES


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or os.path.isabs(name) \
            or "/" in name or "\\" in name or ".." in name.split("."):
        raise ValueError(f"extra_artifacts name {name!r} would escape the checkpoint directory; "
                         "use a plain file name such as 'encoder' or 'notes.txt'")
    return name


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def gather_full_tensors(artifacts: dict[str, Any] | None) -> dict[str, Any]:
    """Run on every rank: turns sharded (DTensor) artifact tensors into full CPU tensors (a collective)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in (artifacts or {}).items():
        if _is_tensor_dict(value):
            value = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
                     for k, v in value.items()}
        out[name] = value
    return out


def _json_bytes(name: str, value: dict) -> bytes:
    try:
        return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_artifacts[{name!r}] is a dict that is neither all tensors nor "
                         f"JSON-serialisable: {e}") from None


def _file_name(name: Any, value: Any) -> str:
    _check_name(name)
    if _is_tensor_dict(value):
        return name if name.endswith(".safetensors") else f"{name}.safetensors"
    if isinstance(value, dict):
        _json_bytes(name, value)
        return name if name.endswith(".json") else f"{name}.json"
    if isinstance(value, (str, bytes, bytearray)):
        return name
    raise ValueError(f"extra_artifacts[{name!r}] is a {type(value).__name__}; expected a dict of tensors, "
                     "a JSON-able dict, str or bytes")


def check(artifacts: dict[str, Any] | None) -> list[str]:
    """The file names the artifacts will get; raises ValueError (naming the artifact) before anything is
    written for an unsafe name, an unsupported value or a name clash."""
    names: list[str] = []
    for name, value in (artifacts or {}).items():
        fname = _file_name(name, value)
        if fname in RESERVED_NAMES or fname in names:
            raise ValueError(f"extra_artifacts[{name!r}] would be written as {fname!r}, which is taken; "
                             "choose another name")
        names.append(fname)
    return names


def encode(artifacts: dict[str, Any] | None) -> dict[str, bytes]:
    """File name -> bytes: tensor dict -> .safetensors, JSON-able dict -> .json, str/bytes as-is."""
    from safetensors.torch import save as safetensors_bytes

    files: dict[str, bytes] = {}
    for fname, (name, value) in zip(check(artifacts), (artifacts or {}).items()):
        if _is_tensor_dict(value):
            # clone() breaks storage sharing (tied weights), which safetensors refuses.
            files[fname] = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in value.items()})
        elif isinstance(value, dict):
            files[fname] = _json_bytes(name, value)
        else:
            files[fname] = value.encode() if isinstance(value, str) else bytes(value)
    return files
