"""One torchrun worker of resume_time.py: saves the checkpoint (--method save) or resumes from it once, timing
each phase, and rank 0 writes every rank's figures to --result (JSON).

    RESUME_BENCH_T0=<time.time() before torchrun started> torchrun --nproc_per_node N \\
        benchmarks/_resume_worker.py --method engine|dcp_plain|read_floor|save --mb 48 --save-dir D --result F

Imports are part of the measured start-up, so each method imports only what it uses (the engine: dcp_resume,
found through the inherited PYTHONPATH, so another checkout can be measured). Phases end at a barrier, so a
phase is the time until the slowest rank has finished it.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: it wins

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

READ_CHUNK = 16 * 2**20  # the floor's sequential read size, into one reused buffer
IO_KEYS = ("rchar", "read_bytes", "syscr")


def build(mb: float, world: int):
    """A stack of Linear layers holding ~mb MB of fp32 parameters in total across the job (widest of
    1024..64 that still gives 4 layers), FSDP2-sharded at world size > 1; Adam, no state yet."""
    width = next((w for w in (1024, 512, 256, 128) if mb * 2**20 / 4 / (w * w + w) >= 4), 64)
    layers = max(1, round(mb * 2**20 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), width


def train_step(model, opt, width: int) -> float:
    torch.manual_seed(1)
    loss = model(torch.randn(8, width)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def proc_io() -> dict:
    """This process's /proc/self/io counters (all threads): rchar = bytes through read syscalls (page cache
    included), read_bytes = bytes fetched from the block device."""
    try:
        with open("/proc/self/io") as f:
            pairs = (line.split(":") for line in f)
            return {k: int(v) for k, v in pairs if k in IO_KEYS}
    except OSError:
        return {}


def stats_dict(stats) -> dict | None:
    """The engine's load_stats (where this checkout has it) as a plain dict of its known fields."""
    if stats is None:
        return None
    fields = ("discovery_s", "verify_s", "load_s", "hashed_bytes")
    get = stats.get if isinstance(stats, dict) else (lambda k: getattr(stats, k, None))
    out = {k: get(k) for k in fields}
    return {k: (v if isinstance(v, (int, float)) or v is None else str(v)) for k, v in out.items()}


def read_floor(state_dir: str, rank: int, world: int) -> int:
    """Read the shard files this rank would load, sequentially in READ_CHUNK reads into one buffer."""
    pattern = "__*_*.distcp" if world == 1 else f"__{rank}_*.distcp"
    buf = bytearray(READ_CHUNK)
    total = 0
    for path in sorted(glob.glob(os.path.join(state_dir, pattern))):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["save", "engine", "dcp_plain", "read_floor"], required=True)
    p.add_argument("--mb", type=float, required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args()
    if a.method in ("save", "engine"):
        from dcp_resume import CheckpointManager
    if a.method == "dcp_plain":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = {"main": time.time()}  # the start-up phase ends here

    def mark(name: str) -> None:
        dist.barrier()
        t[name] = time.time()

    out: dict = {"rank": rank}
    state_dir = os.path.join(a.save_dir, "step_1", "state")
    if a.method == "read_floor":
        io0 = proc_io()
        out["floor_bytes"] = read_floor(state_dir, rank, world)
        mark("load")
    else:
        model, opt, width = build(a.mb, world)
        mark("build")
        if a.method == "save":
            train_step(model, opt, width)  # Adam's moments exist
            mgr = CheckpointManager(a.save_dir, keep_last_n=None, enable_preemption_handling=False, verbose=False)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=1)
            mgr.close()
            mark("load")
        io0 = proc_io()
        if a.method == "engine":
            mgr = CheckpointManager(a.save_dir, keep_last_n=None, enable_preemption_handling=False, verbose=False)
            latest = mgr.find_latest_checkpoint()
            mark("discovery_verify")
            out["latest"] = latest
            mgr.load_checkpoint(latest, state={"model": model, "optimizer": opt})
            mark("load")
            out["load_stats"] = stats_dict(getattr(mgr, "load_stats", None))
        elif a.method == "dcp_plain":
            model_sd, optim_sd = get_state_dict(model, opt)
            sd = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(sd, checkpoint_id=state_dir)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
            mark("load")
        if a.method != "save":
            out["loss"] = train_step(model, opt, width)
            mark("first_step")
    io1 = proc_io()
    out["io"] = {k: io1[k] - io0[k] for k in io1 if k in io0}
    import psutil  # after every phase: its import is not part of any

    out["proc_create"] = psutil.Process().create_time()
    out["times"] = t
    if a.method == "engine":
        import dcp_resume

        out["dcp_resume_file"] = dcp_resume.__file__
        mgr.close()
    everyone = [None] * world
    dist.all_gather_object(everyone, out)
    if rank == 0:
        import json

        with open(a.result, "w") as f:
            json.dump({"method": a.method, "world_size": world, "t0": float(os.environ["RESUME_BENCH_T0"]),
                       "ranks": everyone}, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every figure is written: skip the teardown (a second per launch, and gloo's exit races)


if __name__ == "__main__":
    main()
