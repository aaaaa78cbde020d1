"""`prune SAVE_DIR --keep N`: the engine's retention policy, run by hand."""
from __future__ import annotations

import argparse

from .. import integrity, layout, retention, savedir_lock
from ..errors import SaveDirLockedError
from ..storage import Storage
from .common import EXIT_OK, engine_quiet, positive_int, save_dir_arg, subparser

EPILOG = """examples:
  dcp-resume prune runs/exp1 --keep 3 --dry-run     show what would go; change nothing
  dcp-resume prune runs/exp1 --keep 3               keep the newest 3 complete checkpoints and the best
  dcp-resume prune runs/exp1 --keep 1 --no-keep-best

The engine's retention (CheckpointManager keep_last_n): removes complete checkpoints beyond the newest N,
every interrupted save (no metadata.json) and damaged checkpoints older than the newest complete one. It
never removes the newest complete checkpoint, nor the newest one saved with is_best unless --no-keep-best,
nor the one --auto_resume would load (it reads the newest checkpoints' content hashes to find it, like
`dcp-resume latest`, so damaged newer ones cannot push it out), nor a damaged checkpoint newer than every
complete one (the evidence of what went wrong: remove it by hand once you have looked). Takes the save_dir
lock (.dcp-resume.lock) while it runs, and refuses with exit 1 while a live training job holds it; --dry-run
reads only and takes no lock.
"""


def register(sub) -> None:
    p = subparser(sub, "prune", "remove old and incomplete checkpoints, as the engine's retention does", EPILOG)
    p.add_argument("save_dir", metavar="SAVE_DIR")
    p.add_argument("--keep", type=positive_int, required=True, metavar="N",
                   help="keep the newest N complete checkpoints (N >= 1)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the newest checkpoint saved with is_best (default; --no-keep-best lets it go)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    p.set_defaults(run=run)


def _plan(store: Storage, save_dir: str, keep: int, keep_best: bool) -> tuple[list, list, dict[str, str]]:
    """(to remove, to keep, why each kept one is special)."""
    infos = layout.list_checkpoints(store, save_dir)
    doomed = retention.plan_removals(infos, keep, keep_best)
    with engine_quiet():
        resume = integrity.latest_verified(store, save_dir, infos)
    notes: dict[str, str] = {}
    if resume is not None:
        notes[resume.path] = "--auto_resume loads it"
        doomed = [i for i in doomed if i.path != resume.path]
    for info in infos:  # kept by retention but passed over on resume (latest_verified cached the hashes)
        if info.complete and (resume is None or info.order > resume.order) and integrity.problem(store, info):
            notes[info.path] = "CORRUPT: `dcp-resume verify` names the file"
        elif info.committed and not info.complete:
            notes[info.path] = f"CORRUPT: {info.reason}; kept until a newer complete checkpoint exists"
    best = max((i for i in infos if i.complete and i.meta.get("is_best")), key=lambda i: i.order, default=None)
    if best is not None and all(i.path != best.path for i in doomed):
        notes[best.path] = ", ".join(filter(None, ["best", notes.get(best.path)]))
    gone = {i.path for i in doomed}
    return layout.by_position(doomed), layout.by_position([i for i in infos if i.path not in gone]), notes


def _lock(store: Storage, save_dir: str) -> savedir_lock.SaveDirLock:
    try:
        return savedir_lock.acquire(store, save_dir)
    except SaveDirLockedError as e:  # exit 1, naming the holder
        raise SaveDirLockedError(f"not pruning: {e}. Prune once that job has ended; while it runs, its own "
                                 "retention (keep_last_n) prunes") from None


def run(args) -> int:
    store = args.store
    save_dir = save_dir_arg(store, args.save_dir)
    lock = None if args.dry_run else _lock(store, save_dir)
    try:
        doomed, kept, notes = _plan(store, save_dir, args.keep, args.keep_best)
        verb = "would remove" if args.dry_run else "removed"
        for info in doomed:
            if not args.dry_run:
                store.remove_tree(info.path)
            why = (f"beyond the newest {args.keep}" if info.complete else
                   f"{'damaged, older than the newest complete checkpoint' if info.committed else 'incomplete'}: "
                   f"{info.reason}")
            print(f"{verb} {info.name} ({why})")
        kept_names = ", ".join(f"{i.name} ({notes[i.path]})" if i.path in notes else i.name for i in kept)
        print(f"{'would keep' if args.dry_run else 'kept'} {len(kept)}: {kept_names or 'nothing'}"
              + ("" if doomed else "; nothing to remove"))
    finally:
        if lock is not None:
            lock.release()
    return EXIT_OK
