"""Process setup shared by train.py and main_experiment.py: ranks, device, wrapping, logging."""
from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dcp_resume import exact_ddp
from dcp_resume.storage.local import open_regular_for_writing


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(collective_timeout_s: float = 600.0) -> Runtime:
    """The same code under python, torchrun and accelerate launch: accelerate's state reads the
    launcher's environment and starts the process group (gloo on CPU, NCCL on CUDA). Every collective of
    the default group (DDP's gradient sync included) fails after collective_timeout_s instead of waiting
    forever for a rank that hung."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = datetime.timedelta(seconds=collective_timeout_s)
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    world = acc.num_processes
    if world > 1 and not dist.is_initialized():  # accelerate leaves this to us in some launch modes
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return Runtime(rank=acc.process_index, world_size=world, device=acc.device)


def wrap(model: nn.Module, rt: Runtime, fsdp: bool) -> nn.Module:
    """DDP across ranks, with exact gradient sync (or FSDP2 with --fsdp); the frozen LMs are never sharded
    or synced."""
    model.to(rt.device)
    if fsdp and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for name in ("encoder", "pooler", "adapter_llama", "adapter_qwen"):
            fully_shard(getattr(model, name))
        return model
    if rt.world_size > 1:
        # exact_ddp: DDP that never rebuilds its gradient buckets, so resumes are bit-exact at 3+ ranks
        return exact_ddp(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def setup_logging(rt: Runtime) -> logging.Logger:
    """Rank 0 logs to stdout. Until log_to_file() names the file, what it logs is also held in memory, so that a
    run refused at start (a busy or damaged save_dir) writes nothing there, not even a log line."""
    log = logging.getLogger("latentwire")
    log.setLevel(logging.INFO if rt.is_main else logging.WARNING)
    log.propagate = False
    if not log.handlers:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(out)
        if rt.is_main:
            log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    return log


def log_to_file(log: logging.Logger, log_dir: str | None, save_dir: str | None = None) -> None:
    """From now on rank 0 also appends to <log_dir>/train.log (kept across resumes), starting with what it
    logged before (log_dir None: no file, and nothing held any more). The file is opened like a checkpoint's
    files: never through a symlink, never a FIFO; with `save_dir` (log_dir is its logs/), log_dir must be a real
    directory inside it. ValueError naming the path otherwise."""
    held = next((h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)), None)
    if held is None:  # not rank 0, or already logging to a file
        return
    if log_dir is None:
        log.removeHandler(held)
        return
    path = os.path.join(log_dir, "train.log")
    try:
        if save_dir is not None and os.path.islink(log_dir):
            raise OSError(f"{log_dir} is a symlink to {os.readlink(log_dir)}; train.log is written only inside "
                          "save_dir: remove the link, or pass --log_dir")
        os.makedirs(log_dir, exist_ok=True)
        stream = open(open_regular_for_writing(path, append=True), "a", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot log to {path}: {e.strerror or e}") from None
    f = logging.StreamHandler(stream)
    f.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    held.setTarget(f)
    held.flush()
    log.removeHandler(held)
    log.addHandler(f)
