"""`ls SAVE_DIR` and `latest SAVE_DIR`: what is on disk, and which checkpoint --auto_resume loads.

Both name the same checkpoint as latest: integrity.latest_verified, the engine's own choice on resume (the
newest complete checkpoint whose files match their content hashes; damaged newer ones are passed over). That
reads the newest checkpoint's files in full, and any damaged newer ones; `ls --quick` reads none and marks
the newest complete one by sizes only.
"""
from __future__ import annotations

import json
import sys

from .. import integrity, layout
from ..storage import Storage
from .common import EXIT_FAILED, EXIT_OK, engine_quiet, save_dir_arg, subparser
from .table import human_bytes, render, utc_time

LS_EPILOG = """examples:
  dcp-resume ls runs/exp1            table of every checkpoint directory, complete or not
  dcp-resume ls runs/exp1 --json     the same with every field, for scripts
  dcp-resume ls runs/exp1 --quick    no content hashes read: 'latest' is the newest complete one by sizes

STATUS: complete (metadata.json lists files that exist with their sizes), CORRUPT (complete by sizes, but a
file's content hash does not match: resume skips it), INCOMPLETE (never committed or lost files). BEST marks
the newest checkpoint saved with is_best, the one retention always keeps. '<- latest' marks what
--auto_resume and `dcp-resume latest` pick. Exit 1 when SAVE_DIR holds no checkpoint directory.
"""
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
    p.add_argument("--quick", action="store_true", help="read no content hashes; mark the latest by sizes only")
    p.set_defaults(run=run_ls)
    p = subparser(sub, "latest", "print the checkpoint --auto_resume would load", LATEST_EPILOG)
    p.add_argument("save_dir", metavar="SAVE_DIR")
    p.set_defaults(run=run_latest)


def listing(store: Storage, save_dir: str, quick: bool) -> dict:
    infos = layout.by_position(layout.list_checkpoints(store, save_dir))
    if quick:
        latest = layout.latest_complete(store, save_dir, infos)
    else:
        with engine_quiet():
            latest = integrity.latest_verified(store, save_dir, infos)
    complete = [i for i in infos if i.complete]
    best = max((i for i in complete if i.meta.get("is_best")), key=lambda i: i.order, default=None)
    rows = []
    for info in infos:
        status, reason = ("complete", "") if info.complete else ("incomplete", info.reason)
        if info.complete and not quick and (latest is None or info.order > latest.order):
            problem = integrity.problem(store, info)  # passed over by latest_verified: its result is cached
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
            "latest_verified": not quick, "total_bytes": sum(r["size_bytes"] for r in rows),
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
    if latest is None:
        lines.append("latest: none: no complete checkpoint" + ("" if found["latest_verified"] else " by sizes")
                     + "; --auto_resume would start fresh")
    elif found["latest_verified"]:
        lines.append(f"latest: {latest}, what --auto_resume loads (the newest complete checkpoint whose content "
                     "hashes match)")
    else:
        lines.append(f"latest: {latest} by sizes only (--quick); `dcp-resume latest` also checks content hashes")
    return lines


def run_ls(args) -> int:
    save_dir = save_dir_arg(args.store, args.save_dir)
    found = listing(args.store, save_dir, args.quick)
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
    latest = integrity.latest_verified(args.store, save_dir)  # warns about each damaged checkpoint it passes over
    if latest is None:
        print(f"No checkpoint found to resume in {save_dir}", file=sys.stderr)
        return EXIT_FAILED
    print(latest.path)
    return EXIT_OK
