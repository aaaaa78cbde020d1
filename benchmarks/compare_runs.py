"""Put two save_latency.py runs side by side, e.g. local disk (A) against an object store URL (B).

    python benchmarks/compare_runs.py runs/bench_local/save_latency.json runs/bench_s3/save_latency.json

Prints a markdown table: per method and state size present in both runs, the warm medians of blocking_s,
total_s, load_s and hash_s in A and in B, and B / A (above 1: B is slower). Then the floors, with B / A of
their throughput (below 1: B is slower). --out FILE also writes it there.
"""
from __future__ import annotations

import argparse
import json
import sys

KEYS = ("blocking_s", "total_s", "load_s", "hash_s")
FLOORS = ("memcpy_gbps", "write_gbps", "read_gbps", "cold_read_gbps")


def _label(result: dict) -> str:
    run = result["run"]
    return run.get("storage", "local")


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or a == 0 else f"{b / a:.2f}x"


def _num(v, spec=".3f") -> str:
    return "-" if v is None else f"{v:{spec}}"


def compare(a: dict, b: dict) -> str:
    la, lb = _label(a), _label(b)
    if la == lb:
        la, lb = f"A ({la})", f"B ({lb})"
    rows_b = {(r["method"], r["size_mb"]): r for r in b["results"]}
    head = ["method", "ranks", "state MB"]
    for k in KEYS:
        head += [f"{k} {la}", f"{k} {lb}", f"{k} {lb}/{la}"]
    lines = [f"A: {a['run']['save_dir']} ({a['machine']['summary']})",
             f"B: {b['run']['save_dir']} ({b['machine']['summary']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ra in a["results"]:
        rb = rows_b.get((ra["method"], ra["size_mb"]))
        if rb is None:
            continue
        wa, wb = ra["world_size"], rb["world_size"]
        ranks = str(wa) if wa == wb else f"{wa} / {wb}"
        cells = [ra["method"], ranks, f"{ra['state_bytes'] / 2**20:.0f}"]
        for k in KEYS:
            va = ra[k]["median"] if ra.get(k) else None
            vb = rb[k]["median"] if rb.get(k) else None
            cells += [_num(va), _num(vb), _ratio(va, vb)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"| floor GB/s | {la} | {lb} | {lb}/{la} |", "|---|---|---|---|"]
    for k in FLOORS:
        va, vb = a["floors"].get(k), b["floors"].get(k)
        lines.append(f"| {k} | {_num(va, '.2f')} | {_num(vb, '.2f')} | {_ratio(va, vb)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="save_latency.json of the reference run (e.g. local disk)")
    p.add_argument("b", help="save_latency.json of the compared run (e.g. --save-dir s3://...)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        text = compare(json.load(fa), json.load(fb))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
