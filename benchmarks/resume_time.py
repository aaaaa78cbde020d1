"""Resume time: from process start to the first resumed training step, split into phases, beside plain DCP and
the storage's read floor measured in the same run.

    python benchmarks/resume_time.py --quick --out runs/resume_time
    python benchmarks/resume_time.py --ranks 1 2 4 --sizes 48 192 --repeats 3 --out runs/resume_time
    PYTHONPATH=/path/to/other/checkout python benchmarks/resume_time.py --code-note before --out runs/before

For each (ranks, size) one torchrun job saves a checkpoint with the engine (a stack of fp32 Linear layers of
--sizes MB of parameters in total across the job, FSDP2-sharded at ranks > 1, after one Adam step: state is
~3x the parameters), then every measured run is a fresh torchrun launch (benchmarks/_resume_worker.py; the
children inherit PYTHONPATH, so the engine measured is the one it names):
  engine      CheckpointManager(save_dir).find_latest_checkpoint() (discovery + verification), then
              load_checkpoint(latest, state={"model", "optimizer"}), then one forward/backward/Adam step. Where
              the manager has load_stats, its own discovery / verification / load split is reported.
  dcp_plain   get_state_dict, torch.distributed.checkpoint.load from step_1/state, set_state_dict (a real
              FSDP2 model + optimizer restore, nothing verified), then the same step.
  read_floor  each rank reads the shard files it would load (state/__<rank>_*.distcp; at 1 rank all of them)
              sequentially in 16 MiB reads into one reused buffer, and nothing else: the storage's floor.
Phases: start-up (from just before torchrun is started to the worker's main: torchrun, imports,
init_process_group), build (model, FSDP2, optimizer), discovery, verification, load, first step; each ends
at a barrier. Cold: before each run every file of the checkpoint is fsync'ed and evicted (posix_fadvise
DONTNEED; /proc/sys/vm/drop_caches too where permitted), its residency after eviction recorded. Warm: one
untimed engine run first (it reads every file; --quick reads the files instead), residency before each run
recorded. Each cell runs --repeats times, methods interleaved and rotated (engine, dcp_plain, read_floor, then
dcp_plain, read_floor, engine, ...); figures are medians. Every rank's /proc/self/io deltas (rchar: bytes through read calls, page cache
included; read_bytes: from the device) around discovery + verification + load, and the engine's
hashed_bytes where load_stats has them, are reported per rank and as a fraction of the checkpoint's bytes.
Writes OUT/resume_time.json, OUT/resume_time.md and (with matplotlib) OUT/resume_time.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: it wins

from _bench_floors import evict, resident_fraction  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_resume_worker.py")
METHODS = ("engine", "dcp_plain", "read_floor")
LAUNCH_TIMEOUT_S = 600
READ_CHUNK = 16 * 2**20


# -- launching ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """torchrun and every descendant (its workers run in their own sessions)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [proc, *kids]:
        try:
            os.killpg(p.pid, signal.SIGKILL) if p is proc else p.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    proc.wait()


def launch(method: str, ranks: int, mb: float, ckpt: str, work: str) -> dict:
    """One torchrun job of the worker; its result JSON, with the launcher's wall time."""
    result = os.path.join(work, f"{method}_{time.monotonic_ns()}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, "--method", method,
           "--mb", str(mb), "--save-dir", ckpt, "--result", result]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    env["RESUME_BENCH_T0"] = repr(t0)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise RuntimeError(f"{method} at {ranks} rank(s) ran past {LAUNCH_TIMEOUT_S} s; killed") from None
    wall = time.time() - t0
    worker = output.split("ChildFailedError")[0]  # the worker's own output, not torchrun's traceback
    if not os.path.exists(result):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{worker[-8000:]}")
    with open(result) as f:
        out = json.load(f)
    os.remove(result)
    out.update(launch_wall_s=wall, exit_code=proc.returncode)
    if proc.returncode != 0:  # every figure was taken and gathered: a failure in the teardown after that
        out["exit_output"] = worker[-2000:]
        print(f"  note: {method} at {ranks} rank(s) exited {proc.returncode} after writing its results: "
              f"{worker.strip().splitlines()[0] if worker.strip() else ''}", flush=True)
    return out


# -- page cache ---------------------------------------------------------------------------------
def files_under(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def evict_tree(root: str) -> float | None:
    """Evict every file's pages; the byte-weighted share still resident afterwards (None: cannot tell)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass  # not permitted here: posix_fadvise per file does the work
    for path in files_under(root):
        evict(path)
    return cached_fraction(root)


def cached_fraction(root: str) -> float | None:
    """The byte-weighted share of root's files in the page cache (None: cannot tell)."""
    fracs = [(resident_fraction(p), os.path.getsize(p)) for p in files_under(root)]
    if any(f is None for f, _ in fracs):
        return None
    total = sum(n for _, n in fracs)
    return sum(f * n for f, n in fracs) / total if total else 0.0


# -- one trial's figures ------------------------------------------------------------------------
def phases_of(run: dict) -> dict:
    """Rank 0's phase durations (each ends at a barrier, so they add up to the total)."""
    r0 = run["ranks"][0]
    t, t0 = r0["times"], run["t0"]
    ph = {"startup": t["main"] - t0, "proc_startup": t["main"] - r0["proc_create"]}
    prev = t["main"]
    for name in ("build", "discovery_verify", "load", "first_step"):
        if name in t:
            ph[name] = t[name] - prev
            prev = t[name]
    ph["total"] = prev - t0
    if "discovery_verify" in ph:
        ph["discovery_verification"] = ph.pop("discovery_verify")
        ph["load_wall"] = ph["load"]  # load_checkpoint as timed here, whatever load_stats says
        ph["resume_wall"] = ph["discovery_verification"] + ph["load_wall"]  # the ratio's numerator
        stats = [r.get("load_stats") for r in run["ranks"] if r.get("load_stats")]
        if stats:  # the engine's own split: the slowest rank's figure for each
            for key, name in (("discovery_s", "discovery"), ("verify_s", "verification"), ("load_s", "load")):
                vals = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
                if vals:
                    ph[name] = max(vals)
    return ph


def per_rank_bytes(run: dict, ckpt_bytes: int) -> list[dict]:
    rows = []
    for r in run["ranks"]:
        io = r.get("io", {})
        hashed = (r.get("load_stats") or {}).get("hashed_bytes")
        rows.append({"rank": r["rank"], "rchar": io.get("rchar"), "read_bytes": io.get("read_bytes"),
                     "hashed_bytes": hashed,
                     "rchar_fraction": io["rchar"] / ckpt_bytes if "rchar" in io else None,
                     "read_bytes_fraction": io["read_bytes"] / ckpt_bytes if "read_bytes" in io else None,
                     "hashed_fraction": hashed / ckpt_bytes if isinstance(hashed, (int, float)) else None})
    return rows


def median_of(trials: list[dict], key: str) -> float | None:
    vals = [t["phases"][key] for t in trials if t["phases"].get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(trials: list[dict]) -> dict:
    """Medians per method of every phase, and of each rank's read fractions."""
    out = {}
    for m in METHODS:
        mine = [t for t in trials if t["method"] == m]
        if not mine:
            continue
        keys = sorted({k for t in mine for k in t["phases"]})
        s = {k: median_of(mine, k) for k in keys}
        s["per_rank"] = []
        for i in range(len(mine[0]["per_rank"])):
            row = {"rank": i}
            for k in ("rchar", "read_bytes", "hashed_bytes", "rchar_fraction", "read_bytes_fraction",
                      "hashed_fraction"):
                vals = [t["per_rank"][i][k] for t in mine if t["per_rank"][i][k] is not None]
                row[k] = statistics.median(vals) if vals else None
            s["per_rank"].append(row)
        fr = [r["rchar_fraction"] for r in s["per_rank"] if r["rchar_fraction"] is not None]
        s["max_rank_rchar_fraction"] = max(fr) if fr else None
        s["first_step_losses"] = sorted({r.get("loss") for t in mine for r in t["raw"]["ranks"]} - {None})
        out[m] = s
    eng, plain = out.get("engine"), out.get("dcp_plain")
    if eng and plain and plain.get("load"):  # as timed here: find_latest_checkpoint + load_checkpoint
        out["engine_verify_load_s"] = eng["resume_wall"]
        out["ratio_engine_over_plain_load"] = out["engine_verify_load_s"] / plain["load"]
        out["ratio_engine_over_plain_total"] = eng["total"] / plain["total"]
        out["same_first_step_loss"] = eng["first_step_losses"] == plain["first_step_losses"]  # same state back
    if eng and out.get("read_floor", {}).get("load"):
        out["ratio_engine_over_floor_load"] = out["engine_verify_load_s"] / out["read_floor"]["load"]
    return out


# -- the run ------------------------------------------------------------------------------------
def warm_up(ranks: int, mb: float, ckpt: str, work: str, by_run: bool) -> None:
    if by_run:  # one untimed run: leaves the checkpoint (and all else a run reads) in the page cache
        launch("engine", ranks, mb, ckpt, work)
        return
    for path in files_under(ckpt):  # --quick: the same for the checkpoint's pages, without a launch
        with open(path, "rb") as f:
            while f.read(READ_CHUNK):
                pass


def measure_cell(cache: str, ranks: int, mb: float, ckpt: str, work: str, repeats: int,
                 ckpt_bytes: int) -> list[dict]:
    """`repeats` rounds of every method, interleaved, the order rotated each round (what runs just before a
    method changes the memory and cache it starts with: on this VM a run after another was ~0.2 s slower or
    faster by position alone); cold: the checkpoint evicted before each run."""
    trials = []
    for rep in range(repeats):
        for m in METHODS[rep % len(METHODS):] + METHODS[:rep % len(METHODS)]:
            resident = evict_tree(ckpt) if cache == "cold" else cached_fraction(ckpt)
            run = launch(m, ranks, mb, ckpt, work)
            trials.append({"method": m, "ranks": ranks, "size_mb": mb, "cache": cache, "repeat": rep,
                           "resident_before": resident, "launch_wall_s": run["launch_wall_s"],
                           "exit_code": run["exit_code"], "phases": phases_of(run),
                           "per_rank": per_rank_bytes(run, ckpt_bytes), "raw": run})
    return trials


def cell_line(c: dict) -> str:
    s, e = c["summary"], c["summary"]["engine"]
    return (f"{c['ranks']} rank(s) {c['size_mb']:g} MB params ({c['ckpt_bytes'] / 2**20:.0f} MB ckpt) "
            f"{c['cache']}: engine total {e['total']:.2f} s (verif.+load {s['engine_verify_load_s']:.3f} s), "
            f"dcp_plain load {s['dcp_plain']['load']:.3f} s, floor {s['read_floor']['load']:.3f} s, ratio "
            f"{s['ratio_engine_over_plain_load']:.2f}x, engine max rank read {e['max_rank_rchar_fraction']:.2f} "
            "of ckpt")


def fmt(v, spec=".2f", suffix="") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown(result: dict) -> str:
    run = result["run"]
    lines = [f"Machine: {result['machine']['summary']}", "",
             f"Code: {run['dcp_resume']} (note: {run['code_note'] or '-'}); save dir {run['save_dir']}", "",
             f"Medians of {run['repeats']} fresh torchrun launch(es) per cell, methods interleaved and rotated; "
             "cold: the checkpoint's pages evicted before each run; warm: after "
             + ("one untimed engine run" if run["warm_by_run"] else "reading every file once") + ". Seconds.",
             "Engine split: start-up / build / discovery / verification / load / first step (discovery and "
             "verification as one figure, find_latest_checkpoint, where the engine has no load_stats). "
             "Ratio: engine find_latest_checkpoint + load_checkpoint (discovery, verification and load, timed "
             "here) over dcp_plain load. Read fraction: the largest per-rank rchar "
             "(bytes through read calls) during discovery + verification + load, over the checkpoint's bytes.", "",
             "| ranks | params MB | ckpt MB | cache | engine total | engine split | dcp_plain load | dcp_plain "
             "total | read floor | engine (verif.+load) / dcp_plain load | engine read fraction, max rank | "
             "dcp_plain read fraction, max rank |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        s = c["summary"]
        e, p, f = s.get("engine", {}), s.get("dcp_plain", {}), s.get("read_floor", {})
        dv = (f"{fmt(e.get('discovery'), '.3f')} / {fmt(e.get('verification'), '.3f')}"
              if e.get("verification") is not None else f"{fmt(e.get('discovery_verification'), '.3f')} (d+v)")
        split = (f"{fmt(e.get('startup'))} / {fmt(e.get('build'), '.3f')} / {dv} / {fmt(e.get('load'), '.3f')} / "
                 f"{fmt(e.get('first_step'), '.3f')}")
        lines.append(f"| {c['ranks']} | {c['size_mb']:g} | {c['ckpt_bytes'] / 2**20:.0f} | {c['cache']} | "
                     f"{fmt(e.get('total'))} | {split} | {fmt(p.get('load'), '.3f')} | {fmt(p.get('total'))} | "
                     f"{fmt(f.get('load'), '.3f')} | {fmt(s.get('ratio_engine_over_plain_load'), '.2f', 'x')} | "
                     f"{fmt(e.get('max_rank_rchar_fraction'))} | {fmt(p.get('max_rank_rchar_fraction'))} |")
    lines += ["", "Per-rank bytes read by the engine during discovery + verification + load (MB; fraction of "
              "the checkpoint): rchar; read_bytes, every read of the process from the device in that window (the "
              "checkpoint's on cold runs, and any library pages faulted in); hashed_bytes (load_stats).", "",
              "| ranks | params MB | cache | rank | rchar MB | fraction | read_bytes MB | hashed MB |",
              "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        for r in c["summary"].get("engine", {}).get("per_rank", []):
            mb = [None if r[k] is None else r[k] / 2**20 for k in ("rchar", "read_bytes", "hashed_bytes")]
            lines.append(f"| {c['ranks']} | {c['size_mb']:g} | {c['cache']} | {r['rank']} | {fmt(mb[0], '.1f')} | "
                         f"{fmt(r['rchar_fraction'])} | {fmt(mb[1], '.1f')} | {fmt(mb[2], '.1f')} |")
    differ = [f"{c['ranks']} rank(s) {c['size_mb']:g} MB {c['cache']}" for c in result["cells"]
              if c["summary"].get("same_first_step_loss") is False]
    if differ:
        lines += ["", "First-step loss differs between engine and dcp_plain (not the same state back): "
                  + ", ".join(differ)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no resume_time.png")
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
    for col, cache in enumerate(("cold", "warm")):
        cells = [c for c in result["cells"] if c["cache"] == cache]
        labels = [f"{c['ranks']}r\n{c['size_mb']:g}MB" for c in cells]
        xs = range(len(cells))
        ax = axes[0][col]  # the load phase: engine (verification stacked under load) vs DCP vs the floor
        s = [c["summary"] for c in cells]
        ver = [x["engine"]["discovery_verification"] if x["engine"].get("verification") is None else
               x["engine"]["verification"] for x in s]
        ax.bar([x - 0.27 for x in xs], ver, 0.27, color="tab:orange", label="engine verification")
        ax.bar([x - 0.27 for x in xs], [x["engine_verify_load_s"] - v for x, v in zip(s, ver)], 0.27,
               bottom=ver, color="tab:red", label="engine load (the rest)")
        ax.bar(list(xs), [x["dcp_plain"]["load"] for x in s], 0.27, color="tab:blue", label="dcp_plain load")
        ax.bar([x + 0.27 for x in xs], [x["read_floor"]["load"] for x in s], 0.27, color="tab:gray",
               label="read floor")
        ax.set_title(f"{cache} cache: verification + load (s)")
        ax = axes[1][col]  # end to end: process start to first step
        ax.bar([x - 0.2 for x in xs], [x["engine"]["total"] for x in s], 0.4, color="tab:red", label="engine")
        ax.bar([x + 0.2 for x in xs], [x["dcp_plain"]["total"] for x in s], 0.4, color="tab:blue",
               label="dcp_plain")
        ax.set_title(f"{cache} cache: process start to first step (s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(list(xs), labels, fontsize=8)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", help="world sizes (default 1 2 4)")
    p.add_argument("--sizes", type=float, nargs="+", help="MB of model parameters in total across the job "
                   "(state with Adam: ~3x; default 48 192)")
    p.add_argument("--repeats", type=int, help="timed runs per method and cell (default 3)")
    p.add_argument("--quick", action="store_true", help="defaults 16 MB of parameters, ranks 1 2, 1 repeat "
                   "(an explicit --ranks, --sizes or --repeats still wins); warm cache by reading the checkpoint's "
                   "files instead of an untimed run")
    p.add_argument("--cache", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    p.add_argument("--out", default="runs/resume_time")
    p.add_argument("--save-dir", default=None, help="where checkpoints go (default: a temp dir under --out); "
                   "only what the run creates there is removed")
    p.add_argument("--code-note", default="", help="free text stored in the JSON (e.g. before / after)")
    a = p.parse_args(argv)
    quick = a.quick
    for name, quick_default, default in (("ranks", [1, 2], [1, 2, 4]), ("sizes", [16], [48, 192]),
                                         ("repeats", 1, 3)):
        if getattr(a, name) is None:
            setattr(a, name, quick_default if quick else default)
    if a.repeats < 1 or min(a.ranks) < 1 or min(a.sizes) <= 0:
        p.error("--repeats, --ranks and --sizes must be positive")
    os.makedirs(a.out, exist_ok=True)
    base = os.path.abspath(a.save_dir or a.out)
    made_base = not os.path.exists(base)
    os.makedirs(base, exist_ok=True)
    root = tempfile.mkdtemp(prefix="resume_time_", dir=base)  # all this run writes; removed at the end
    work = os.path.join(root, "results")
    os.makedirs(work)
    import dcp_resume  # what the workers import too: PYTHONPATH first
    import torch

    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")}
    machine["summary"] = (f"cpu, {machine['cpus']} CPUs, torch {machine['torch']}, gloo, OMP threads "
                          f"{machine['omp_num_threads']}")
    result = {"machine": machine, "run": {
        "code_note": a.code_note, "dcp_resume": os.path.dirname(dcp_resume.__file__),
        "pythonpath": os.environ.get("PYTHONPATH"), "ranks": a.ranks, "sizes_mb": a.sizes, "repeats": a.repeats,
        "caches": a.cache, "save_dir": root, "warm_by_run": not a.quick, "methods": list(METHODS),
        "started": time.strftime("%F %T")},
        "cells": [], "trials": []}
    t_start = time.time()
    try:
        for ranks in a.ranks:
            for mb in a.sizes:
                ckpt = os.path.join(root, f"r{ranks}_{mb:g}mb")
                launch("save", ranks, mb, ckpt, work)
                ckpt_bytes = sum(os.path.getsize(f) for f in files_under(os.path.join(ckpt, "step_1")))
                for cache in [c for c in ("cold", "warm") if c in a.cache]:
                    if cache == "warm":
                        warm_up(ranks, mb, ckpt, work, by_run=not a.quick)
                    trials = measure_cell(cache, ranks, mb, ckpt, work, a.repeats, ckpt_bytes)
                    result["trials"] += trials
                    result["cells"].append({"ranks": ranks, "size_mb": mb, "cache": cache,
                                            "ckpt_bytes": ckpt_bytes, "summary": summarize(trials)})
                    print(cell_line(result["cells"][-1]), flush=True)
                shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if made_base:
            try:
                os.rmdir(base)
            except OSError:
                pass
    result["run"]["elapsed_s"] = time.time() - t_start
    with open(os.path.join(a.out, "resume_time.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(a.out, "resume_time.md"), "w") as f:
        f.write(text)
    print(text, end="")
    plot(result, os.path.join(a.out, "resume_time.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
