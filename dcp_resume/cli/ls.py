"""`ls SAVE_DIR` and `latest SAVE_DIR`: what is on disk, and which checkpoint --auto_resume loads.

`ls` answers in seconds on a big save_dir: by default it checks what a resume checks before it reads a shard
(sizes, DCP's index and its hash: integrity.latest_candidate), so 'latest' is the checkpoint --auto_resume
tries first; shard contents are verified as a resume reads them. `ls --verify` and `latest` hash every file
(integrity.latest_verified, threads) and pass over damaged ones; `ls --quick` reads sizes only. The footer
says which checks ran.
"""
from __future__ import annotations

import json
import sys

from .. import integrity, layout
from ..storage import Storage
from .common import EXIT_FAILED, EXIT_OK, engine_quiet, save_dir_arg, subparser
from .table import human_bytes, render, utc_time

LS_EPILOG = """examples:
  dcp-resume ls runs/exp1            table of every checkpoint directory, complete or not (no shard is read)
  dcp-resume ls runs/exp1 --json     the same with every field, for scripts
  dcp-resume ls runs/exp1 --verify   also hash every file: CORRUPT rows, and 'latest' is what a resume loads
  dcp-resume ls runs/exp1 --quick    sizes only: 'latest' is the newest complete one by sizes

STATUS: complete (metadata.json lists files that exist with their sizes), CORRUPT (committed, but a listed file
is missing or resized, metadata.json is broken, or DCP's index or, with --verify, a file's content hash does not
match: resume skips it, and it is kept as evidence), INCOMPLETE (no metadata.json: a save interrupted before its
commit, removed by the next save). BEST marks the newest checkpoint saved with is_best, the one retention always
keeps. '<- latest' marks what --auto_resume tries first (with --verify: what it loads, as `dcp-resume latest`
says). Exit 1 when SAVE_DIR holds no checkpoint directory.
"""
CHECKS = ("quick", "index", "verify")  # what ls reads: sizes; + DCP's index and its hash; + every file's hash
LATEST_EPILOG = """examples:
  dcp-resume latest runs/exp1
  python latentwire/train.py --resume_from "$(dcp-resume latest runs/exp1)"

Prints the path --auto_resume would load: the newest complete checkpoint whose content hashes match. Damaged
newer ones are skipped with a warning on stderr naming the file. Exit 1 when there is none.
"""


def register(sub) -> None:
    p = subparser(sub, "ls", "list the checkpoints in SAVE_DIR and which one --auto_resume loads", LS_EPILOG)
    p.add_argument("save_dir", metavar="SAVE_DIR")
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    checks = p.add_mutually_exclusive_group()
    checks.add_argument("--verify", action="store_const", const="verify", dest="checks",
                        help="hash every file of the checkpoints (reads them all); mark what a resume loads")
    checks.add_argument("--quick", action="store_const", const="quick", dest="checks",
                        help="read sizes only (not DCP's index); mark the latest by sizes")
    p.set_defaults(run=run_ls, checks="index")
    p = subparser(sub, "latest", "print the checkpoint --auto_resume would load", LATEST_EPILOG)
    p.add_argument("save_dir", metavar="SAVE_DIR")
    p.set_defaults(run=run_latest)


def listing(store: Storage, save_dir: str, checks: str) -> dict:
    """`checks`: one of CHECKS."""
    infos = layout.by_position(layout.list_checkpoints(store, save_dir))
    with engine_quiet():
        if checks == "quick":
            latest = layout.latest_complete(store, save_dir, infos)
        elif checks == "index":
            latest = integrity.latest_candidate(store, save_dir, infos)
        else:
            latest = integrity.latest_verified(store, save_dir, infos)
    complete = [i for i in infos if i.complete]
    best = max((i for i in complete if i.meta.get("is_best")), key=lambda i: i.order, default=None)
    rows = []
    for info in infos:
        status, reason = ("complete", "") if info.complete else ("corrupt" if info.committed else "incomplete",
                                                                 info.reason)
        if info.complete and checks != "quick" and (latest is None or info.order > latest.order):
            # passed over by the choice of latest (its result is cached): why
            problem = integrity.index_problem(store, info) if checks == "index" else integrity.problem(store, info)
            if problem is not None:
                status, reason = "corrupt", problem
        m = info.meta
        rows.append({"name": info.name, "path": info.path, "step": m.get("step"), "epoch": m.get("epoch"),
                     "kind": m.get("kind"), "timestamp": m.get("timestamp"), "world_size": m.get("world_size"),
                     "size_bytes": sum(info.on_disk.values()), "status": status,
                     "complete": info.complete, "reason": reason, "is_best": bool(m.get("is_best")),
                     "best": best is not None and info.path == best.path,
                     "latest": latest is not None and info.path == latest.path})
    return {"save_dir": save_dir, "checkpoints": rows, "latest": latest.path if latest else None,
            "checks": checks, "latest_verified": checks == "verify", "total_bytes": sum(r["size_bytes"] for r in rows),
            "free_bytes": store.free_bytes(save_dir)}


def _table(found: dict) -> list[str]:
    def cell(v) -> str:
        return "-" if v is None else str(v)

    rows = []
    for r in found["checkpoints"]:
        status = {"complete": "complete", "corrupt": f"CORRUPT: {r['reason']}",
                  "incomplete": f"INCOMPLETE: {r['reason']}"}[r["status"]]
        rows.append([r["name"], cell(r["step"]), cell(r["epoch"]), cell(r["kind"]),
                     utc_time(r["timestamp"]) if r["timestamp"] else "-", cell(r["world_size"]),
                     human_bytes(r["size_bytes"]), "best" if r["best"] else "",
                     status + ("  <- latest" if r["latest"] else "")])
    return render(["NAME", "STEP", "EPOCH", "KIND", "TIME (UTC)", "RANKS", "SIZE", "BEST", "STATUS"], rows,
                  right={1, 2, 5, 6})


def _footer(found: dict) -> list[str]:
    rows = found["checkpoints"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("complete", "corrupt", "incomplete")}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    free = ("free space unknown (object store)" if found["free_bytes"] is None else
            f"{human_bytes(found['free_bytes'])} free on this filesystem")
    lines = [f"{len(rows)} checkpoint directories ({tally}), {human_bytes(found['total_bytes'])} in total; {free}"]
    latest = next((r["name"] for r in rows if r["latest"]), None)
    checked = {"quick": "sizes only (--quick)",
               "index": "sizes, DCP's index and its hash; no shard was read: a resume checks each byte it reads, "
                        "`ls --verify` or `dcp-resume verify` hash them all",
               "verify": "sizes, DCP's index and the content hash of every file (--verify)"}[found["checks"]]
    if latest is None and counts["complete"] + counts["corrupt"]:
        lines.append("latest: none: no committed checkpoint passes these checks; --auto_resume refuses to start "
                     "over (exit 2) and changes nothing")
    elif latest is None:
        lines.append("latest: none: no checkpoint was ever committed here; --auto_resume would start fresh")
    elif found["checks"] == "verify":
        lines.append(f"latest: {latest}, what --auto_resume loads (the newest complete checkpoint whose content "
                     "hashes match)")
    else:
        lines.append(f"latest: {latest}, what --auto_resume tries first")
    lines.append(f"checked: {checked}")
    return lines


def run_ls(args) -> int:
    save_dir = save_dir_arg(args.store, args.save_dir)
    found = listing(args.store, save_dir, args.checks)
    if args.json:
        print(json.dumps(found, indent=2))
    elif found["checkpoints"]:
        print("\n".join(_table(found) + [""] + _footer(found)))
    if not found["checkpoints"]:
        print(f"dcp-resume: no checkpoint directories (step_*/epoch*) in {save_dir}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_latest(args) -> int:
    save_dir = save_dir_arg(args.store, args.save_dir)
    infos = layout.list_checkpoints(args.store, save_dir)
    latest = integrity.latest_verified(args.store, save_dir, infos)  # warns about each damaged one it passes over
    if latest is None:
        damaged = integrity.all_damaged(args.store, save_dir, infos)  # hashes cached by latest_verified
        print(f"No checkpoint found to resume in {save_dir}" + (
            "" if damaged is None else f": every committed checkpoint is damaged, so --auto_resume refuses to start "
                                       f"over: {damaged}"), file=sys.stderr)
        return EXIT_FAILED
    print(latest.path)
    return EXIT_OK
