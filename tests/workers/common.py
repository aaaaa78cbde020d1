"""Tiny models and helpers shared by the test workers (run under torchrun or plain python)."""
import os

import torch
import torch.distributed as dist
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.out = nn.Linear(16, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.inp(x))
        for b in self.blocks:
            h = torch.relu(b(h))
        return self.out(h)


def make_training(seed=0, wrap=None):
    """A model (optionally wrapped), AdamW and a LambdaLR, freshly initialised from `seed`."""
    torch.manual_seed(seed)
    model = Tiny()
    if wrap is not None:
        model = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    return model, opt, sched


def train_steps(model, opt, sched, steps, seed=1):
    g = torch.Generator().manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0))
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def full(t):
    """A plain CPU tensor, gathering DTensor shards."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_state(model, opt):
    """Model and optimizer state by parameter name, as full tensors: what 'bit-exact' compares."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = {k: full(v) for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, opt)
    states = {f"{p}.{k}": full(v) for p, s in osd["state"].items() for k, v in s.items()}
    return {"model": msd, "optim": states, "lr": [g["lr"] for g in opt.param_groups]}


def init_dist():
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for b in model.blocks:
        fully_shard(b)
    return fully_shard(model)
