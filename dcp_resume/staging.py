"""Host staging buffers for async saves: allocated once per tensor and reused by every later save.

The copy into these buffers is all a caller of an async save waits for. Copying into memory that is
already allocated (and, on CUDA, pinned, on a side stream) runs ~20x faster than into fresh memory,
which is why `dcp.async_save` (fresh memory each time) blocks longer than this does.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .compat import flatten_state_dict, unflatten_state_dict


class StagingBuffers:
    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}  # flattened key -> host buffer (or DTensor over one)
        self._streams: dict[torch.device, Any] = {}  # a side stream per GPU the state lives on

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A snapshot of `state`: tensors copied into the cached buffers, other values deep-copied.
        Returns once every copy has landed, so the caller may change `state` right away."""
        flat, mapping = flatten_state_dict(state)
        staged: dict[str, Any] = {}
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                staged[key] = self._copy(key, value)
            else:
                staged[key] = copy.deepcopy(value)
        for stream in self._streams.values():  # every GPU's copies, not only the first one's
            stream.synchronize()
        for stale in self.buffers.keys() - flat.keys():  # keys gone from the state: free their memory
            del self.buffers[stale]
        return unflatten_state_dict(staged, mapping)

    def nbytes(self) -> int:
        """Host memory the buffers hold now (this rank's shards)."""
        return sum(b.to_local().nbytes if isinstance(b, DTensor) else b.nbytes for b in self.buffers.values())

    def _copy(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if isinstance(src, DTensor):
            local = src.to_local()
            if not (isinstance(buf, DTensor) and _fits(buf.to_local(), local) and buf.placements == src.placements):
                buf = DTensor.from_local(_alloc(local), src.device_mesh, src.placements, run_check=False,
                                         shape=src.shape, stride=src.stride())
            self._copy_into(buf.to_local(), local)
        else:
            if not (isinstance(buf, torch.Tensor) and not isinstance(buf, DTensor) and _fits(buf, src)):
                buf = _alloc(src)
            self._copy_into(buf, src)
        self.buffers[key] = buf
        return buf

    def _copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        src = src.detach()
        if src.is_cuda:
            stream = self._streams.get(src.device)
            if stream is None:
                stream = self._streams[src.device] = torch.cuda.Stream(device=src.device)
            stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)


def _fits(buf: torch.Tensor, src: torch.Tensor) -> bool:
    """A buffer is reused for the same shape and dtype, pinned for a GPU tensor (a model moved to the GPU
    after its first save gets pinned buffers, not slow synchronous copies into pageable ones)."""
    return buf.shape == src.shape and buf.dtype == src.dtype and buf.is_pinned() == src.is_cuda


def _alloc(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=like.is_cuda)
