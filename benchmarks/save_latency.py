"""Save latency of checkpoint methods, side by side with physical floors measured in the same run.

    python benchmarks/save_latency.py --quick --out runs/bench
    torchrun --nproc_per_node 2 benchmarks/save_latency.py --sizes 64 128 --repeats 5 --out runs/bench

State = a stack of fp32 Linear layers of --sizes MB per rank plus AdamW's two moments (about 3x).
Methods: torch_save_rank0 (full state on rank 0, torch.save, fsync), dcp_sync (dcp.save), dcp_async_thread
(dcp.async_save, thread mode), engine_sync and engine_async (dcp_resume.CheckpointManager). Per method:
median and spread of blocking_s (what the caller waits), total_s (until committed and durable), load_s,
peak RSS growth, and step_slowdown (training-like steps while a background save runs, relative to
steps without one). The first (cold) save is reported apart. Floors: memcpy_gbps (copy into
preallocated buffers), write_gbps (write+fsync, one writer per rank), read_gbps; on CUDA also d2h_gbps.
Writes DIR/save_latency.json, DIR/save_latency.md and (with matplotlib) DIR/save_latency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402

METHODS = ("torch_save_rank0", "dcp_sync", "dcp_async_thread", "engine_sync", "engine_async")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(msg: str) -> None:
    if rank() == 0:
        print(msg, flush=True)


# -- state --------------------------------------------------------------------------------------
def build_state(mb: int, device: str):
    width = 1024
    layers = max(1, round(mb * 2**20 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    opt.step()  # creates both Adam moments
    return model, opt


def state_bytes(model, opt) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return n


# -- measuring helpers --------------------------------------------------------------------------
class PeakRSS:
    """Samples VmRSS every 5 ms while active; `growth` is the peak above the starting RSS, in bytes."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.growth = self.peak - self.start


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def train_like_step(x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for _ in range(4):
        x = torch.tanh(x @ x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def steps_while(done: threading.Event | None, x: torch.Tensor, n_max: int = 200) -> list[float]:
    """Step times while `done` is not set (or 20 steps when done is None: the no-save baseline)."""
    times = []
    while len(times) < (20 if done is None else n_max) and (done is None or not done.is_set()):
        times.append(train_like_step(x))
    return times


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# -- floors -------------------------------------------------------------------------------------
def floors(nbytes: int, out: str, device: str) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    memcpy = nbytes / (time.perf_counter() - t0) / 1e9
    path = os.path.join(out, f"floor_rank{rank()}.bin")
    data = src.numpy().tobytes()
    barrier()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    barrier()
    write = nbytes * world() / (time.perf_counter() - t0) / 1e9
    os.system("sync")
    barrier()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    barrier()
    read = nbytes * world() / (time.perf_counter() - t0) / 1e9
    os.remove(path)
    result = {"memcpy_gbps": memcpy, "write_gbps": write, "read_gbps": read}
    if device == "cuda":
        gpu = src.cuda()
        pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        pinned.copy_(gpu)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pinned.copy_(gpu, non_blocking=True)
        torch.cuda.synchronize()
        result["d2h_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
    return result


# -- methods ------------------------------------------------------------------------------------
def save_once(method: str, model, opt, path: str, mgr, x) -> dict:
    """One save: returns blocking_s, total_s and step times during the background part."""
    done, steps = threading.Event(), []
    barrier()
    t0 = time.perf_counter()
    if method == "torch_save_rank0":
        if rank() == 0:
            os.makedirs(path, exist_ok=True)
            target = os.path.join(path, "state.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, target)
            fsync_tree(path)
        blocking = time.perf_counter() - t0
    elif method == "dcp_sync":
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)
        blocking = time.perf_counter() - t0
    elif method == "dcp_async_thread":
        future = dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)
        blocking = time.perf_counter() - t0
        threading.Thread(target=lambda: (future.result(), done.set()), daemon=True).start()
        steps = steps_while(done, x)
        future.result()
    else:
        mgr.save_checkpoint({"model": model, "optimizer": opt}, step=int(path.rsplit("_", 1)[1]))
        blocking = time.perf_counter() - t0
        if method == "engine_async":
            threading.Thread(target=lambda: (mgr.wait(), done.set()), daemon=True).start()
            steps = steps_while(done, x)
            mgr.wait()
    barrier()
    return {"blocking_s": blocking, "total_s": time.perf_counter() - t0, "steps": steps}


def load_once(method: str, model, opt, path: str, mgr) -> float:
    barrier()
    t0 = time.perf_counter()
    if method == "torch_save_rank0":
        sd = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
    elif method.startswith("dcp"):
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
    else:
        mgr.load_checkpoint(path, state={"model": model, "optimizer": opt})
    barrier()
    return time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(method: str, mb: int, repeats: int, out: str, device: str, x) -> dict:
    model, opt = build_state(mb, device)
    nbytes = state_bytes(model, opt)
    root = os.path.join(out, "ckpt", f"{method}_{mb}")
    if rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    barrier()
    mgr = None
    if method.startswith("engine"):
        mgr = CheckpointManager(root, keep_last_n=2, verbose=False, enable_preemption_handling=False,
                                async_save=method == "engine_async")
    runs, loads = [], []
    with PeakRSS() as rss:
        for i in range(repeats + 1):  # the first is the cold save
            path = os.path.join(root, f"step_{i + 1}")
            runs.append(save_once(method, model, opt, path, mgr, x))
            if i > 0:
                loads.append(load_once(method, model, opt, path, mgr))
            if rank() == 0 and not method.startswith("engine") and i > 1:
                shutil.rmtree(os.path.join(root, f"step_{i - 1}"), ignore_errors=True)
    if mgr:
        mgr.close()
    warm = runs[1:]
    base = statistics.median(steps_while(None, x))
    during = [t for r in warm for t in r["steps"]]
    return {"method": method, "world_size": world(), "state_bytes": nbytes, "size_mb": mb,
            "cold_blocking_s": runs[0]["blocking_s"], "cold_total_s": runs[0]["total_s"],
            "blocking_s": spread([r["blocking_s"] for r in warm]), "total_s": spread([r["total_s"] for r in warm]),
            "load_s": spread(loads), "peak_rss_growth_bytes": rss.growth,
            "step_slowdown": (statistics.median(during) / base) if during else None, "repeats": repeats}


# -- report -------------------------------------------------------------------------------------
def report(result: dict, out: str) -> None:
    with open(os.path.join(out, "save_latency.json"), "w") as f:
        json.dump(result, f, indent=2)
    fl = result["floors"]
    lines = [f"Machine: {result['machine']['summary']}", "",
             f"Floors: memcpy {fl['memcpy_gbps']:.2f} GB/s, write+fsync {fl['write_gbps']:.2f} GB/s, "
             f"read {fl['read_gbps']:.2f} GB/s" + (f", D2H {fl['d2h_gbps']:.2f} GB/s" if "d2h_gbps" in fl else ""),
             "", "| method | ranks | state MB | blocking s | total s | load s | cold blocking s | "
             "blocking / memcpy floor | GB/s of write floor | step slowdown | peak RSS +MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        total_gb = r["state_bytes"] * r["world_size"] / 1e9
        floor_s = r["state_bytes"] / 1e9 / fl["memcpy_gbps"]
        slow = "-" if r["step_slowdown"] is None else f"{r['step_slowdown']:.2f}x"
        lines.append(f"| {r['method']} | {r['world_size']} | {r['state_bytes'] / 2**20:.0f} | "
                     f"{r['blocking_s']['median']:.3f} | {r['total_s']['median']:.3f} | {r['load_s']['median']:.3f} | "
                     f"{r['cold_blocking_s']:.3f} | {r['blocking_s']['median'] / floor_s:.1f}x | "
                     f"{total_gb / r['total_s']['median'] / fl['write_gbps']:.0%} | {slow} | "
                     f"{r['peak_rss_growth_bytes'] / 2**20:.0f} |")
    with open(os.path.join(out, "save_latency.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no save_latency.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("blocking_s", "total_s")):
        for m in METHODS:
            rows = sorted((r for r in result["results"] if r["method"] == m), key=lambda r: r["state_bytes"])
            ax.plot([r["state_bytes"] / 2**20 for r in rows], [r[key]["median"] for r in rows], "o-", label=m)
        ax.set_xlabel("state per rank (MB)")
        ax.set_ylabel(f"{key} (median)")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "save_latency.png"), dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="MB of model parameters per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="one size of ~288 MB of state, 3 repeats")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="runs/save_latency")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats = [96], 3
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    os.makedirs(a.out, exist_ok=True)
    x = torch.randn(256, 256, device=a.device) / 16
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "world_size": world()}
    machine["summary"] = (f"{machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
                          f"{world()} rank(s)")
    fl = floors(max(a.sizes) * 3 * 2**20, a.out, a.device)
    log(f"floors: {json.dumps({k: round(v, 2) for k, v in fl.items()})}")
    results = []
    for mb in a.sizes:
        for m in a.methods:
            r = measure(m, mb, a.repeats, a.out, a.device, x)
            results.append(r)
            log(f"{m:>18} {r['state_bytes'] / 2**20:7.0f} MB/rank: blocking {r['blocking_s']['median']:.3f} s, "
                f"total {r['total_s']['median']:.3f} s, load {r['load_s']['median']:.3f} s"
                + (f", step slowdown {r['step_slowdown']:.2f}x" if r["step_slowdown"] else ""))
    if rank() == 0:
        report({"machine": machine, "floors": fl, "results": results}, a.out)
        shutil.rmtree(os.path.join(a.out, "ckpt"), ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
