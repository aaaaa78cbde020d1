"""gpu_check.sh's table, from save_latency.py's JSON (one file per state size): per size and method, what a save
blocks the caller for against the device-to-host floor (d2h_gbps: the state copied into preallocated pinned
host memory, best of 3), and what it takes until committed and durable against the write floor (write_gbps:
write + fsync of one preallocated buffer, best of 3). Standard library only, so it runs whatever else failed.

    python benchmarks/_gpu_check_table.py [--md OUT/summary.md] OUT/save_latency_256/save_latency.json ...

A file that is missing (its step failed or was skipped) is named in the output instead of a row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ORDER = ("engine_async", "dcp_async_cached", "dcp_async_thread", "engine_sync", "dcp_sync", "torch_save_rank0")
HEADER = ("| params MB/rank | method | state MB/rank | blocking s | D2H floor s | blocking / D2H | total s | "
          "write floor s | total / write | peak RSS +MB |")


def _med(r: dict, key: str) -> float:
    return r[key]["median"]


def _num(v: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def rows(result: dict) -> list[str]:
    fl = result["floors"]
    d2h, write = fl.get("d2h_gbps"), fl.get("write_gbps")
    out = []
    ranked = sorted(result["results"], key=lambda r: (r["size_mb"], ORDER.index(r["method"])
                                                       if r["method"] in ORDER else len(ORDER)))
    for r in ranked:
        per_rank_gb = r["state_bytes"] / 1e9
        d2h_s = per_rank_gb / d2h if d2h else None  # per rank: every rank copies its own state at once
        write_s = per_rank_gb * r["world_size"] / write if write else None  # all ranks share the write floor
        blocking, total = _med(r, "blocking_s"), _med(r, "total_s")
        out.append(f"| {r['size_mb']} | {r['method']} | {r['state_bytes'] / 2**20:.0f} | {blocking:.3f} | "
                   f"{_num(d2h_s, '.3f')} | {_num(None if d2h_s is None else blocking / d2h_s, '.2f', 'x')} | "
                   f"{total:.3f} | {_num(write_s, '.3f')} | "
                   f"{_num(None if write_s is None else total / write_s, '.2f', 'x')} | "
                   f"{r['peak_rss_growth_bytes'] / 2**20:.0f} |")
    return out


def floors_line(path: str, result: dict) -> str:
    fl, m = result["floors"], result["machine"]

    def g(key: str) -> str:
        return "n/a" if fl.get(key) is None else f"{fl[key]:.2f} GB/s"
    missing = "" if fl.get("d2h_gbps") is not None else " (no D2H floor: not a CUDA run)"
    return (f"- {os.path.basename(os.path.dirname(path)) or path}: {m.get('summary', '?')}; sizes "
            f"{result['run'].get('sizes')}, {result['run'].get('repeats')} warm rounds; floors: D2H pinned "
            f"{g('d2h_gbps')}{missing}, write+fsync {g('write_gbps')}, memcpy {g('memcpy_gbps')}, "
            f"read {g('read_gbps')}")


def table(paths: list[str]) -> str:
    lines, notes, body = [], [], []
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except FileNotFoundError:
            notes.append(f"- {path}: missing (that save_latency step failed or was skipped)")
            continue
        except (OSError, ValueError) as e:
            notes.append(f"- {path}: unreadable ({type(e).__name__}: {e})")
            continue
        try:
            body += rows(result)
            notes.append(floors_line(path, result))
            notes += [f"  - {m}: not run ({why})" for m, why in (result.get("unavailable") or {}).items()]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            notes.append(f"- {path}: not a complete save_latency.json ({type(e).__name__}: {e})")
    lines += ["Blocking = what save_checkpoint / async_save blocks the caller (median of the warm rounds); "
              "D2H floor = state bytes / d2h_gbps. Total = until committed and durable; write floor = "
              "state bytes / write_gbps. Ratios near 1x are at the floor.", ""]
    if body:
        lines += [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|", *body]
    else:
        lines.append("(no results to tabulate)")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="save_latency.json files")
    p.add_argument("--md", default=None, help="also write the table here (markdown)")
    a = p.parse_args(argv)
    text = table(a.json)
    sys.stdout.write(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
