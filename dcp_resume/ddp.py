"""Bit-exact resumes under DistributedDataParallel at 3 or more ranks.

Why a resume drifts: DDP all-reduces gradients bucket by bucket, and where a value sits in its bucket decides
the order in which the ranks' copies are added (a ring all-reduce starts each chunk of the bucket at another
rank). DDP lays its buckets out twice in every process: the first backward uses one bucket holding every
parameter, after which the reducer rebuilds them in the order gradients became ready. A resumed process
therefore takes its first step with the layout the uninterrupted run used only at step 1, the sums round
differently, and the two runs part bitwise from there. Two ranks hide it (a + b == b + a); three do not.

Two ways to keep the layout fixed, measured in `benchmarks/ddp_exactness.py` (README: "What exactness costs"):
- `exact_ddp(module, **ddp_kwargs)` builds DDP with `find_unused_parameters=True`, under which DDP never
  rebuilds its buckets: every step of every process uses the same layout. It costs one autograd-graph traversal
  and one tiny all-reduce per step (DDP prints a harmless one-time note that it found no unused parameters).
- `exact_gradient_sync(ddp_model)`, for a DDP model built elsewhere (accelerate's prepare, a library), registers
  a communication hook that all-reduces each parameter's gradient on its own, so the summation order depends
  only on the parameter, never on the bucket. It costs one collective per parameter tensor.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

_MARK = "_dcp_resume_exact_gradient_sync"


class InexactResumeWarning(UserWarning):
    """The live setup cannot resume bit-exactly (the run continues, statistically the same, bitwise not)."""


def _per_tensor_allreduce(group, bucket):  # no annotations: DDP checks them, and they are strings here
    world = dist.get_world_size(group)
    works = []
    for grad in bucket.gradients():  # views into bucket.buffer(), one per parameter
        grad.div_(world)
        works.append(dist.all_reduce(grad, group=group, async_op=True))
    done = torch.futures.collect_all([w.get_future() for w in works])
    buffer = bucket.buffer()
    return done.then(lambda _: buffer)


def exact_ddp(module: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel(module, **ddp_kwargs) whose gradient buckets are never rebuilt, so a resumed run
    is bit-identical to an uninterrupted one at any world size (see the module docstring)."""
    if ddp_kwargs.get("static_graph"):
        raise ValueError("exact_ddp: static_graph=True rebuilds DDP's buckets after the first step, which is what "
                         "makes resumes inexact; drop it, or wrap with DDP yourself and call exact_gradient_sync")
    ddp_kwargs["find_unused_parameters"] = True
    return nn.parallel.DistributedDataParallel(module, **ddp_kwargs)


def exact_gradient_sync(model: nn.Module, process_group=None) -> nn.Module:
    """Make a DistributedDataParallel model reduce gradients in an order that does not depend on DDP's
    bucket layout, so a resumed run stays bit-identical to an uninterrupted one at any world size.
    Call it once, right after wrapping (before the first step); returns the model. Under accelerate, call it
    on the prepared model. A model that is not DDP is returned unchanged."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if not getattr(model, _MARK, False):
        model.register_comm_hook(process_group, _per_tensor_allreduce)
        setattr(model, _MARK, True)
    return model


def is_exact(model: nn.Module) -> bool:
    """Whether a DDP model reduces gradients the same way in every step of every process."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    if getattr(model, _MARK, False) or model.process_group.size() <= 2:
        return True
    return bool(model.find_unused_parameters) and not model.static_graph


def warn_if_inexact(modules: dict[str, nn.Module]) -> None:
    """Warn, naming the state key and the fix, for each DDP model whose resume cannot be bit-exact."""
    for key, module in modules.items():
        if not is_exact(module):
            warnings.warn(
                f"state[{key!r}] is DistributedDataParallel at {module.process_group.size()} ranks with default "
                "gradient buckets: a run resumed from this checkpoint reduces its first step's gradients in "
                "another order and is not bit-identical to an uninterrupted run. Call dcp_resume.exact_ddp(module) "
                "to wrap (DDP with find_unused_parameters=True), or dcp_resume.exact_gradient_sync(model) on a DDP "
                "model built elsewhere, for exact resumes", InexactResumeWarning, stacklevel=3)
