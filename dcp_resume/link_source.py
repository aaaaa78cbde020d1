"""Which earlier checkpoint an incremental save links unchanged bytes from, so that no two checkpoints a resume
may need share one copy of anything.

Copies that share an inode are one copy. If the new checkpoint linked its unchanged bytes from the newest
complete checkpoint, one damaged file would cost both, and every checkpoint since the bytes were written. So a
save links from the checkpoint before the newest, and never a file the newest also holds: the kept checkpoints
alternate between two sets of files, each holding the unchanged bytes once, and the newest two share nothing.
A single damaged or missing file then costs at most the newest checkpoint: a resume falls back one save.

Files of a checkpoint that this process found damaged are never linked (integrity.suspect), nor are files of a
checkpoint whose DCP index does not match its files: their tensors are written anew. With keep_last_n=1 only
one checkpoint is kept anyway, so a save links from it.
"""
from __future__ import annotations

import os

from . import dcp_io, integrity, layout, verification
from .incremental import FINGERPRINTS, Source
from .logs import logger
from .storage import Storage


def choose(store: Storage, save_dir: str, target: str, keep_last_n: int | None) -> Source | None:
    """Rank 0: the checkpoint a save into `target` may link from, with the fingerprints of the chunks it may
    link (those stored in files it may link); None: write everything."""
    done = sorted((i for i in layout.list_checkpoints(store, save_dir)
                   if i.complete and i.path != target and integrity.known_problem(store, i) is None),
                  key=lambda i: i.order, reverse=True)
    if keep_last_n == 1:
        base, newest = (done[0], None) if done else (None, None)
    else:
        base, newest = (done[1], done[0]) if len(done) > 1 else (None, None)
    if base is None or not isinstance(base.meta.get(FINGERPRINTS), dict):
        return None
    problem = verification.dcp_problem(store, base)
    if problem is not None:
        logger.warning("Writing every tensor of %s: %s, which it would link from, fails a check (%s)", target,
                       base.path, problem)
        return None
    shared = set() if newest is None else _identities(store, newest)
    state = os.path.join(base.path, layout.STATE_DIR)
    barred = {name for name in store.listdir(state)
              if integrity.suspect(store, os.path.join(state, name))
              or _identity(store, os.path.join(state, name)) in shared}
    fingerprints = base.meta[FINGERPRINTS]
    if barred:  # the keys stored in those files are written anew: drop their fingerprints
        index = dcp_io.read_metadata(store, state)
        unlinkable = {where.fqn for where, stored in index.storage_data.items() if stored.relative_path in barred}
        fingerprints = {key: value for key, value in fingerprints.items() if key.rsplit("@", 1)[0] not in unlinkable}
    return Source(base.path, fingerprints)


def _identities(store: Storage, info: layout.CheckpointInfo) -> set:
    state = os.path.join(info.path, layout.STATE_DIR)
    return {_identity(store, os.path.join(state, name)) for name in store.listdir(state)}


def _identity(store: Storage, path: str):
    try:
        return store.file_identity(path)
    except OSError:
        return path
