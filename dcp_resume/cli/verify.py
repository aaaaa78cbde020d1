"""`verify PATH|SAVE_DIR [--quick]`: every bad file of one checkpoint, or of every checkpoint in a save_dir."""
from __future__ import annotations

import sys

from .. import layout, verification
from ..storage import Storage
from .common import EXIT_FAILED, EXIT_OK, any_dir_arg, is_checkpoint, subparser
from .table import human_bytes

EPILOG = """examples:
  dcp-resume verify runs/exp1/step_500     one checkpoint
  dcp-resume verify runs/exp1              every checkpoint in the save_dir
  dcp-resume verify runs/exp1 --quick      sizes only: no file is read

Checks every file metadata.json lists (present, recorded size, recorded xxh3_64 content hash), and that DCP's
index state/.metadata covers state/: each *.distcp there is one it reads, each file it reads exists and is
long enough, each item it lists has stored bytes, each file in state/ is listed in metadata.json.
Prints `BAD <checkpoint>/<file>: <problem>` for every bad file, then one OK/BAD line per checkpoint.

exit codes: 0 every checkpoint verifies; 1 one is BAD, or PATH is a single checkpoint that is incomplete.
In a save_dir, a directory without metadata.json is an interrupted save (never loaded, removed by the next
save or `dcp-resume prune`): it is reported INCOMPLETE and does not fail the check.
"""


def register(sub) -> None:
    p = subparser(sub, "verify", "check sizes, content hashes and DCP shard coverage of checkpoints", EPILOG)
    p.add_argument("path", metavar="PATH|SAVE_DIR")
    p.add_argument("--quick", action="store_true", help="sizes and DCP coverage only; no content hashes")
    p.set_defaults(run=run)


def _print(report: verification.Report, name: str, quick: bool) -> None:
    for rel, problems in report.problems.items():
        print(f"BAD  {name}/{rel}: {'; '.join(problems)}")
    if report.status == "incomplete":
        print(f"INCOMPLETE  {name}: {report.note}")
    elif report.status == "bad":
        print(f"BAD  {name}: {len(report.problems)} bad file(s); resume skips this checkpoint")
    else:
        checked = "sizes match (--quick: contents not read)" if quick else "sizes and content hashes match"
        unhashed = f", {report.unhashed} without a recorded hash checked by size" if report.unhashed else ""
        if report.unknown_hashes:
            unhashed += (f" (they record {', '.join(sorted(report.unknown_hashes))}, unknown to this dcp-resume: "
                         "upgrade it to check their contents)")
        print(f"OK   {name}: {report.files} files, {human_bytes(report.bytes)}, {checked}{unhashed}; "
              f"DCP index covers {report.shards} shard file(s)")


def run(args) -> int:
    store = args.store
    path = any_dir_arg(store, args.path)
    if is_checkpoint(store, path):
        report = verification.verify_checkpoint(store, path, args.quick)
        _print(report, Storage.basename(path), args.quick)
        return EXIT_OK if report.status == "ok" else EXIT_FAILED
    infos = layout.by_position(layout.list_checkpoints(store, path))
    if not infos:
        print(f"dcp-resume: no checkpoint directories (step_*/epoch*) in {path}", file=sys.stderr)
        return EXIT_FAILED
    counts = dict.fromkeys(verification.STATUSES, 0)
    for info in infos:
        report = verification.verify_checkpoint(store, info.path, args.quick)
        _print(report, info.name, args.quick)
        counts[report.status] += 1
    print(f"{len(infos)} checkpoint directories: {counts['ok']} OK, {counts['bad']} BAD, "
          f"{counts['incomplete']} incomplete (interrupted saves)")
    return EXIT_FAILED if counts["bad"] else EXIT_OK
