"""`dcp-resume`: look at a save_dir without starting training.

Exit codes: 0 ok, 1 check failed / nothing found, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import layout

EXAMPLES = """examples:
  dcp-resume ls runs/exp1          every checkpoint, complete or not, and which one --auto_resume picks
  dcp-resume latest runs/exp1      the path --auto_resume would use (exit 1 if none)
"""


def _usage_error(msg: str) -> int:
    print(f"dcp-resume: error: {msg}", file=sys.stderr)
    return 2


def _cmd_ls(args) -> int:
    infos = layout.list_checkpoints(args.save_dir)
    latest = layout.latest_complete(args.save_dir)
    rows = [{"name": i.name, "step": i.meta.get("step"), "epoch": i.meta.get("epoch"), "kind": i.meta.get("kind"),
             "timestamp": i.meta.get("timestamp"), "world_size": i.meta.get("world_size"),
             "complete": i.complete, "reason": i.reason, "is_best": bool(i.meta.get("is_best")),
             "latest": latest is not None and i.path == latest.path} for i in infos]
    if args.json:
        print(json.dumps({"save_dir": args.save_dir, "checkpoints": rows}, indent=2))
    else:
        for r in rows:
            status = "complete" if r["complete"] else f"INCOMPLETE: {r['reason']}"
            mark = " <- latest" if r["latest"] else ""
            print(f"{r['name']:<14} step={r['step']!s:<8} epoch={r['epoch']!s:<4} kind={r['kind']!s:<10} "
                  f"{status}{' best' if r['is_best'] else ''}{mark}")
    return 0 if rows else 1


def _cmd_latest(args) -> int:
    latest = layout.latest_verified(args.save_dir)  # what --auto_resume picks: hashes checked
    if latest is None:
        print(f"No checkpoint found to resume in {args.save_dir}", file=sys.stderr)
        return 1
    print(latest.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-resume", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ls = sub.add_parser("ls", help="list checkpoints in SAVE_DIR")
    p_ls.add_argument("save_dir")
    p_ls.add_argument("--json", action="store_true")
    p_latest = sub.add_parser("latest", help="print the checkpoint --auto_resume would use")
    p_latest.add_argument("save_dir")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.save_dir):
        return _usage_error(f"SAVE_DIR {args.save_dir} is not a directory")
    return {"ls": _cmd_ls, "latest": _cmd_latest}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
