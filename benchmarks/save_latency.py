"""Save latency of checkpoint methods, side by side with physical floors measured in the same run.

    python benchmarks/save_latency.py --quick --out runs/bench
    torchrun --nproc_per_node 2 benchmarks/save_latency.py --sizes 64 128 --repeats 5 --out runs/bench
    torchrun --nproc_per_node 2 benchmarks/save_latency.py --quick --save-dir /mnt/other_fs/bench --out runs/bench
    torchrun --nproc_per_node 2 benchmarks/save_latency.py --sizes 32 --save-dir s3://bucket/bench --out runs/bench_s3
    python benchmarks/run_with_s3_emulator.py -- torchrun --nproc_per_node 2 benchmarks/save_latency.py \\
        --sizes 32 --save-dir s3://bench/run --out runs/bench_s3     # moto's S3 emulator on 127.0.0.1

State = a stack of fp32 Linear layers of --sizes MB per rank plus AdamW's two moments (about 3x).
Methods: torch_save_rank0 (full state on rank 0, torch.save, fsync), dcp_sync (dcp.save), dcp_async_thread
(dcp.async_save, thread mode), dcp_async_cached (the same with DCP's own reused staging buffers,
FileSystemWriter(cache_staged_state_dict=True), one writer kept across saves: what staging.py competes with;
reported unavailable, with DCP's error, where it cannot run), engine_sync and engine_async
(dcp_resume.CheckpointManager). Every method's
state is built first; then each round saves with every method once, in an order that changes every round
(so drift of a shared disk's write-back state hits all methods alike, and no method always follows the same
one). Before every save, outside the timings, one element of every tensor of the state changes (as after a
training step): else the engine's incremental saves (on by default) would find the state unchanged since its
previous checkpoint and link every tensor instead of writing it. Round 0 is the cold save, reported apart; the
--repeats warm rounds give median and spread of
blocking_s (what the caller waits), total_s (until committed and durable) and load_s (timed right after
each warm save), plus peak RSS growth and step_slowdown (training-like steps while a background save runs,
relative to steps without one). Engine methods also get hash_s: hashing that rank's checkpoint files with
dcp_resume.hashing.file_digest right after the save (page cache), timed outside the save, as the engine does
inside it. Floors, best of 3 each (see _bench_floors.py): memcpy_gbps, write_gbps (write+fsync, one writer
per rank), read_gbps (page-cache read, as a load right after a save), cold_read_gbps (after evicting the
file's pages); on CUDA also d2h_gbps. Checkpoints and floor files go to --save-dir (default OUT/ckpt); only
what the run created there is removed. --save-dir may be a URL (s3://bucket/prefix, gs://, memory://): every
method then writes and reads through fsspec (DCP's FsspecWriter/FsspecReader, torch.save/load on fsspec
streams, the engine on the URL), the floors become one PUT / one GET of an object per rank, and hash_s reads
the shards back from the store, as the engine does there; compare_runs.py puts such a run beside a local one.
Writes OUT/save_latency.json, OUT/save_latency.md (with a Targets section) and (with matplotlib)
OUT/save_latency.png.
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
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from _bench_floors import all_gather, barrier, broadcast, log, measure_floors, rank, world  # noqa: E402
from _bench_report import compute_targets, report  # noqa: E402

from dcp_resume import CheckpointManager  # noqa: E402
from dcp_resume import dcp_io, hashing, layout  # noqa: E402
from dcp_resume.storage import open_storage  # noqa: E402

METHODS = ("torch_save_rank0", "dcp_sync", "dcp_async_thread", "dcp_async_cached", "engine_sync", "engine_async")


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


def touch(model, opt) -> None:
    """Change one element of every tensor of the state in place, as a training step would: nothing is left
    byte-identical to the previous save, so the engine's incremental saves write everything, as DCP does."""
    tensors = [*model.parameters(), *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    with torch.no_grad():
        for t in tensors:
            t.view(-1)[:1].add_(1)
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()


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


def remove(path: str) -> None:
    open_storage(path).remove_tree(path)


def dcp_target(path: str, load: bool = False) -> dict:
    """dcp.save/async_save/load keyword for `path`: plain DCP on a local path (checkpoint_id, FileSystemWriter
    with fsync), DCP's fsspec writer/reader on a URL (the writer the engine uses there: no fsync)."""
    store = open_storage(path)
    if not store.remote:
        return {"checkpoint_id": path}
    if load:
        reader, options = store.dcp_reader_class()
        return {"storage_reader": reader(path, **options)}
    return {"storage_writer": store.dcp_writer(path)}


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# -- methods ------------------------------------------------------------------------------------
def save_once(method: str, model, opt, path: str, mgr, x) -> dict:
    """One save: returns blocking_s, total_s and step times during the background part."""
    done, steps = threading.Event(), []
    barrier()
    t0 = time.perf_counter()
    if method == "torch_save_rank0":
        if rank() == 0:
            target, sd = os.path.join(path, "state.pt"), {"model": model.state_dict(), "optimizer": opt.state_dict()}
            store = open_storage(path)
            if store.remote:  # one streamed upload; durable when the object is closed
                with store.fs.open(target, "wb") as f:
                    torch.save(sd, f)
            else:
                os.makedirs(path, exist_ok=True)
                torch.save(sd, target)
                fsync_tree(path)
        blocking = time.perf_counter() - t0
    elif method == "dcp_sync":
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, **dcp_target(path))
        blocking = time.perf_counter() - t0
    elif method in ("dcp_async_thread", "dcp_async_cached"):
        target = ({"checkpoint_id": path, "storage_writer": mgr} if method == "dcp_async_cached" else
                  dcp_target(path))  # dcp_async_cached: the one cached writer, in the manager's slot
        future = dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, **target)
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


def cached_staging_problem(run_dir: str) -> str | None:
    """Why DCP's cached staging (dcp_async_cached) cannot run here, or None (collective: a tiny async_save on
    every rank). It needs a local save_dir, and on torch 2.13's CPU build async_save with it raises (it pins
    memory through the accelerator)."""
    if open_storage(run_dir).remote:
        return "FileSystemWriter(cache_staged_state_dict=True) writes local paths only"
    path = os.path.join(run_dir, "cached_staging_probe")
    try:
        writer = dcp.FileSystemWriter(path, cache_staged_state_dict=True)
        dcp.async_save({"w": torch.zeros(4)}, storage_writer=writer).result()
        return None
    except Exception as e:  # what DCP raised, reported in the results
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        barrier()
        if rank() == 0:
            remove(path)


def load_once(method: str, model, opt, path: str, mgr) -> float:
    barrier()
    t0 = time.perf_counter()
    if method == "torch_save_rank0":
        target = os.path.join(path, "state.pt")
        store = open_storage(target)
        if store.remote:
            with store.fs.open(target, "rb") as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
        else:
            sd = torch.load(target, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
    elif method.startswith("dcp"):
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        dcp.load(sd, **dcp_target(path, load=True))
    else:
        mgr.load_checkpoint(path, state={"model": model, "optimizer": opt})
    barrier()
    return time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def hash_once(path: str) -> tuple[float, int]:
    """(seconds until every rank has hashed the shard files it wrote into checkpoint `path`, bytes hashed by
    all ranks): what the engine spends on hashing.file_digest inside each save, timed here outside it. On a URL
    that is a read back of every shard from the store."""
    store = open_storage(path)
    state_dir = os.path.join(path, layout.STATE_DIR)
    names = dcp_io.shard_files_of_rank(store, state_dir, rank())
    barrier()
    t0 = time.perf_counter()
    mine = sum(hashing.file_digest(store, os.path.join(state_dir, n))[0] for n in names)
    barrier()
    return time.perf_counter() - t0, sum(all_gather(mine))


def rounds(methods: list[str], n_rounds: int) -> list[list[str]]:
    """Round r runs every method once: the rows of a Williams design (base order 0, 1, n-1, 2, n-2, ...,
    rotated by r), so the first method and each method's predecessor change from round to round."""
    n, base, lo, hi = len(methods), [0], 1, len(methods) - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    return [[methods[(b + r) % n] for b in base] for r in range(n_rounds)]


def prepare_save_dir(spec: str | None, out: str, options: dict | None = None) -> tuple[str, Callable[[], None]]:
    """The one place that turns --save-dir into where this run writes: a new run directory (a key prefix on a
    URL) inside it, and a cleanup that removes only what this run created."""
    base = spec or os.path.join(out, "ckpt")
    stamp = f"save_latency_{os.getpid()}_{time.strftime('%Y%m%d-%H%M%S')}"
    store = open_storage(base, options)  # on every rank: remembered for every path under a URL
    if store.remote:
        run_dir = broadcast(f"{base.rstrip('/')}/{stamp}")
        store.check_reachable(run_dir)  # a missing bucket or a dead endpoint: one clear error, on every rank
        if rank() == 0:
            store.makedirs(run_dir)
        barrier()
        return run_dir, lambda: store.remove_tree(run_dir) if rank() == 0 else None
    base = os.path.abspath(base)
    top = base  # the topmost directory this run creates, if any
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    created = broadcast(not os.path.exists(base))  # rank 0's view, before any rank creates it
    run_dir = broadcast(os.path.join(base, stamp))
    if rank() == 0:
        os.makedirs(run_dir)
    barrier()

    def cleanup() -> None:
        if rank() != 0:
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        d = base
        while created:  # the directories above it that this run made, each only while empty
            try:
                os.rmdir(d)
            except OSError:
                break
            if d == top:
                break
            d = os.path.dirname(d)

    return run_dir, cleanup


def measure_size(mb: int, methods: list[str], repeats: int, run_dir: str, device: str, x,
                 options: dict | None = None) -> tuple[list, list]:
    """Every method at one state size, interleaved: (results in `methods` order, the order of each round)."""
    benches = {}
    for m in methods:  # one model + AdamW per method, all built before the first save
        model, opt = build_state(mb, device)
        root = os.path.join(run_dir, f"{m}_{mb}")
        mgr = (CheckpointManager(root, keep_last_n=2, verbose=False, enable_preemption_handling=False,
                                 async_save=m == "engine_async", storage_options=options)
               if m.startswith("engine") else
               dcp.FileSystemWriter(root, cache_staged_state_dict=True) if m == "dcp_async_cached" else None)
        benches[m] = {"model": model, "opt": opt, "root": root, "mgr": mgr, "runs": [], "loads": [], "hashes": [],
                      "hashed_bytes": 0, "rss": 0}
    order = rounds(methods, repeats + 1)
    base_steps = []
    for i, names in enumerate(order):  # round 0 is the cold save of every method
        base_steps += steps_while(None, x)
        for m in names:
            b = benches[m]
            path = os.path.join(b["root"], f"step_{i + 1}")
            touch(b["model"], b["opt"])
            with PeakRSS() as rss:
                run = save_once(m, b["model"], b["opt"], path, b["mgr"], x)
                if i > 0 and m.startswith("engine"):
                    hash_s, b["hashed_bytes"] = hash_once(path)
                    b["hashes"].append(hash_s)
                if i > 0:
                    b["loads"].append(load_once(m, b["model"], b["opt"], path, b["mgr"]))
            b["runs"].append(run)
            b["rss"] = max(b["rss"], rss.growth)
            if rank() == 0 and not m.startswith("engine") and i > 1:  # the engine keeps the last 2 itself
                remove(os.path.join(b["root"], f"step_{i - 1}"))
            log(f"{'cold' if i == 0 else f'warm {i}/{repeats}'} {m:>17} {mb} MB params: "
                f"blocking {run['blocking_s']:.3f} s, total {run['total_s']:.3f} s"
                + (f", load {b['loads'][-1]:.3f} s" if i > 0 else "")
                + (f", hash {b['hashes'][-1]:.3f} s" if i > 0 and b["hashes"] else ""))
    base = statistics.median(base_steps)
    results = []
    for m in methods:
        b = benches[m]
        if m.startswith("engine"):
            b["mgr"].close()
        warm, during = b["runs"][1:], [t for r in b["runs"][1:] for t in r["steps"]]
        hash_s = spread(b["hashes"]) if b["hashes"] else None
        results.append({
            "method": m, "world_size": world(), "state_bytes": state_bytes(b["model"], b["opt"]), "size_mb": mb,
            "cold_blocking_s": b["runs"][0]["blocking_s"], "cold_total_s": b["runs"][0]["total_s"],
            "blocking_s": spread([r["blocking_s"] for r in warm]), "total_s": spread([r["total_s"] for r in warm]),
            "load_s": spread(b["loads"]), "hash_s": hash_s,
            "hash_gbps": b["hashed_bytes"] / 1e9 / hash_s["median"] if hash_s else None,
            "peak_rss_growth_bytes": b["rss"],
            "step_slowdown": (statistics.median(during) / base) if during else None, "repeats": repeats})
    return results, order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="MB of model parameters per rank")
    p.add_argument("--repeats", type=int, default=3, help="warm rounds (after the cold one)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="one size of ~288 MB of state, 3 repeats")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="runs/save_latency", help="where the JSON, markdown and plot go")
    p.add_argument("--save-dir", default=None, help="where checkpoints and floor files are written (default "
                   "OUT/ckpt); a URL (s3://bucket/prefix, gs://, memory://) measures an object store through fsspec")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="fsspec options for a URL --save-dir (e.g. '{\"endpoint_url\": ...}'); credentials and "
                   "endpoint otherwise come from the environment (AWS_*, AWS_ENDPOINT_URL, ~/.aws)")
    a = p.parse_args(argv)
    options = None
    if a.storage_options is not None:
        try:
            options = json.loads(a.storage_options)
        except json.JSONDecodeError as e:
            p.error(f"--storage-options is not JSON: {e}")
        if not isinstance(options, dict):
            p.error("--storage-options must be a JSON object")
        if not (a.save_dir and open_storage(a.save_dir).remote):
            p.error("--storage-options applies to a URL --save-dir only")
    if a.quick:
        a.sizes, a.repeats = [96], 3
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    methods = [m for m in METHODS if m in a.methods]
    unavailable = {}
    if a.device == "cuda":  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    os.makedirs(a.out, exist_ok=True)
    run_dir, cleanup = prepare_save_dir(a.save_dir, a.out, options)
    store = open_storage(run_dir)
    remote = store.remote
    try:
        x = torch.randn(256, 256, device=a.device) / 16
        machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                   "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "world_size": world()}
        machine["summary"] = (f"{machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
                              f"{world()} rank(s)")
        if "dcp_async_cached" in methods:
            problem = broadcast(cached_staging_problem(run_dir))
            if problem is not None:
                log(f"dcp_async_cached unavailable here: {problem}")
                unavailable["dcp_async_cached"] = problem
                methods.remove("dcp_async_cached")
        fl, trials = measure_floors(max(a.sizes) * 3 * 2**20, run_dir, a.device)
        log(f"floors: {json.dumps({k: v if v is None else round(v, 2) for k, v in fl.items()})}")
        results, schedule = [], {}
        for mb in a.sizes:
            rows, schedule[str(mb)] = measure_size(mb, methods, a.repeats, run_dir, a.device, x, options)
            results += rows
            for r in rows:
                log(f"{r['method']:>18} {r['state_bytes'] / 2**20:7.0f} MB/rank: blocking "
                    f"{r['blocking_s']['median']:.3f} s, total {r['total_s']['median']:.3f} s, load "
                    f"{r['load_s']['median']:.3f} s" + (f", hash {r['hash_s']['median']:.3f} s" if r["hash_s"] else "")
                    + (f", step slowdown {r['step_slowdown']:.2f}x" if r["step_slowdown"] else ""))
        barrier()
        if rank() == 0:
            result = {"machine": machine, "run": {"save_dir": os.path.dirname(run_dir), "sizes": a.sizes,
                                                  "storage": store.protocol if remote else "local",
                                                  "repeats": a.repeats, "rounds": schedule,
                                                  "state_changes_between_saves": True},
                      "floors": fl, "floor_trials": trials, "results": results, "unavailable": unavailable,
                      "targets": compute_targets(results, fl, remote)}
            report(result, a.out, METHODS)
    finally:
        cleanup()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
