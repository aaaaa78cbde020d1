"""save_latency.py's outputs: the targets computed from a run, save_latency.json, save_latency.md and the plot."""
from __future__ import annotations

import json
import os


def _med(r: dict, key: str) -> float:
    return r[key]["median"]


def compute_targets(results: list[dict], floors: dict, remote: bool = False) -> list[dict]:
    """The issue's targets per state size, each computed only when the methods it compares were run. `value` is
    a ratio (unit "x") or a share of a floor (unit "%", stored as a fraction); step_slowdown rows have no target.
    `remote`: the run wrote to a URL, where the write and read floors are one PUT and one GET per rank."""
    write, read = ("PUT", "GET") if remote else ("", "page cache")
    rows = []
    for mb in sorted({r["size_mb"] for r in results}):
        by = {r["method"]: r for r in results if r["size_mb"] == mb}

        def add(measure, needs, value, op=None, target=None, unit="x"):
            if all(n in by for n in needs):
                v = value(*(by[n] for n in needs))
                if v is None:
                    return
                met = None if op is None else (v <= target if op == "<=" else v >= target)
                rows.append({"size_mb": mb, "measure": measure, "value": v, "unit": unit, "op": op,
                             "target": target, "met": met})

        def rate(r, key):  # GB/s of all ranks together
            return r["state_bytes"] * r["world_size"] / 1e9 / _med(r, key)

        add("engine_async.blocking_s / memcpy floor time for its state", ["engine_async"],
            lambda a: _med(a, "blocking_s") / (a["state_bytes"] / 1e9 / floors["memcpy_gbps"]), "<=", 2.0)
        add("engine_async.blocking_s / dcp_async_thread.blocking_s", ["engine_async", "dcp_async_thread"],
            lambda a, d: _med(a, "blocking_s") / _med(d, "blocking_s"), "<=", 0.25)
        add("engine_sync.total_s / dcp_sync.total_s", ["engine_sync", "dcp_sync"],
            lambda e, d: _med(e, "total_s") / _med(d, "total_s"), "<=", 1.1)
        add(f"state bytes x ranks / engine_sync.total_s, of write_gbps{f' ({write})' if write else ''}",
            ["engine_sync"],
            lambda e: rate(e, "total_s") / floors["write_gbps"], ">=", 0.70, "%")
        add(f"state bytes x ranks / engine_sync.load_s, of read_gbps ({read})", ["engine_sync"],
            lambda e: rate(e, "load_s") / floors["read_gbps"], ">=", 0.70, "%")
        for m in ("engine_async", "dcp_async_thread"):
            add(f"{m}.step_slowdown", [m], lambda r: r["step_slowdown"])
    return rows


def _fmt(v, unit: str, spec: str = ".2f") -> str:
    return "-" if v is None else (f"{v:.0%}" if unit == "%" else f"{v:{spec}}x")


def markdown(result: dict) -> str:
    fl = result["floors"]

    def gbps(key, label):
        return f"{label} {fl[key]:.2f} GB/s" if fl.get(key) is not None else f"{label} n/a"

    where = result["run"].get("storage", "local")
    if where == "local":
        io = [gbps("write_gbps", "write+fsync"), gbps("read_gbps", "read (page cache)"),
              gbps("cold_read_gbps", "cold read")]
    else:
        io = [gbps("write_gbps", "write (one PUT per rank)"), gbps("read_gbps", "read (one GET per rank)"),
              "cold read n/a (object store: every read is a GET, no page cache to evict)"]
    floors = ", ".join([gbps("memcpy_gbps", "memcpy"), *io] + ([gbps("d2h_gbps", "D2H")] if "d2h_gbps" in fl else []))
    lines = [f"Machine: {result['machine']['summary']}", "",
             f"Save dir: {result['run']['save_dir']} ({where})", "",
             f"Floors (best of 3 each): {floors}", "",
             f"Saves interleaved round-robin across methods: one cold round, then {result['run']['repeats']} warm "
             "rounds (medians); each method's order changes every round.", "",
             "| method | ranks | state MB | blocking s | total s | load s | hash s | hash GB/s | cold blocking s | "
             "blocking / memcpy floor | GB/s of write floor | step slowdown | peak RSS +MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        total_gb = r["state_bytes"] * r["world_size"] / 1e9
        floor_s = r["state_bytes"] / 1e9 / fl["memcpy_gbps"]
        slow = "-" if r["step_slowdown"] is None else f"{r['step_slowdown']:.2f}x"
        hash_s = "-" if r.get("hash_s") is None else f"{_med(r, 'hash_s'):.3f}"
        hash_gbps = "-" if r.get("hash_gbps") is None else f"{r['hash_gbps']:.2f}"
        lines.append(f"| {r['method']} | {r['world_size']} | {r['state_bytes'] / 2**20:.0f} | "
                     f"{_med(r, 'blocking_s'):.3f} | {_med(r, 'total_s'):.3f} | {_med(r, 'load_s'):.3f} | "
                     f"{hash_s} | {hash_gbps} | {r['cold_blocking_s']:.3f} | {_med(r, 'blocking_s') / floor_s:.1f}x | "
                     f"{total_gb / _med(r, 'total_s') / fl['write_gbps']:.0%} | {slow} | "
                     f"{r['peak_rss_growth_bytes'] / 2**20:.0f} |")
    for method, why in (result.get("unavailable") or {}).items():
        lines += ["", f"{method}: not run here ({why})"]
    if result["targets"]:
        lines += ["", "### Targets", "", "| params MB/rank | measure | value | target | met |",
                  "|---|---|---|---|---|"]
        for t in result["targets"]:
            sign = {"<=": "≤", ">=": "≥"}.get(t["op"])
            target = "-" if sign is None else f"{sign} {_fmt(t['target'], t['unit'], 'g')}"
            met = "-" if t["met"] is None else ("✓" if t["met"] else "✗")
            lines.append(f"| {t['size_mb']} | {t['measure']} | {_fmt(t['value'], t['unit'])} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str, methods) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no save_latency.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("blocking_s", "total_s")):
        for m in methods:
            rows = sorted((r for r in result["results"] if r["method"] == m), key=lambda r: r["state_bytes"])
            ax.plot([r["state_bytes"] / 2**20 for r in rows], [_med(r, key) for r in rows], "o-", label=m)
        ax.set_xlabel("state per rank (MB)")
        ax.set_ylabel(f"{key} (median)")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict, out: str, methods) -> None:
    with open(os.path.join(out, "save_latency.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(out, "save_latency.md"), "w") as f:
        f.write(text)
    print(text, end="")
    plot(result, os.path.join(out, "save_latency.png"), methods)
