"""A verified, self-contained copy of one checkpoint: `dcp-resume copy CKPT DEST`.

Every file metadata.json lists is streamed from the source, hashed on the way and checked against its
recorded hash, and written to DEST (files linked from earlier checkpoints arrive as plain files, so DEST
depends on nothing); metadata.json is written last, atomically, so DEST is a committed checkpoint or
nothing is. The destination may be another store (a local checkpoint to s3://, or back).
"""
from __future__ import annotations

import os

from . import hashing, integrity, layout
from .errors import CheckpointExistsError, CorruptCheckpointError, IncompleteCheckpointError
from .storage import JSON_LIMIT, Storage

_CHUNK = 16 << 20


def copy_checkpoint(src_store: Storage, src: str, dst_store: Storage, dst: str) -> int:
    """Copy checkpoint `src` to `dst` (which must not exist), verifying every byte; returns the bytes copied."""
    info = layout.inspect_dir(src_store, src)
    if not info.complete:
        raise IncompleteCheckpointError(f"{src} is not a complete checkpoint ({info.reason}); copy a complete "
                                        "one (`dcp-resume ls <save_dir>` lists them)")
    if dst_store.exists(dst):
        raise CheckpointExistsError(f"{dst} already exists; copy to a new directory")
    integrity.check(src_store, info)  # names the damaged file before anything is written
    copied = 0
    try:
        for rel, entry in sorted(info.meta["files"].items()):
            copied += _copy_file(src_store, os.path.join(src, rel), dst_store, os.path.join(dst, rel), rel, entry)
        dst_store.sync_dir(os.path.join(dst, layout.STATE_DIR))
        dst_store.commit_atomically(os.path.join(dst, layout.METADATA_FILE),
                                    src_store.read_bytes(os.path.join(src, layout.METADATA_FILE),
                                                         limit=JSON_LIMIT))
    except BaseException:
        dst_store.remove_tree(dst)  # no half copy that looks like a checkpoint is left (it has no metadata.json)
        raise
    return copied


def _copy_file(src_store: Storage, src: str, dst_store: Storage, dst: str, rel: str, entry: dict) -> int:
    found = hashing.recorded(entry)
    digest = hashing.ALGORITHMS[found[0]]() if found else None
    size = 0
    dst_store.makedirs(os.path.dirname(dst))

    def chunks():
        nonlocal size
        with src_store.open_read(src) as f:
            while block := f.read(_CHUNK):
                if digest is not None:
                    digest.update(block)
                size += len(block)
                yield block
    dst_store.write_stream(dst, chunks())
    if size != entry.get("size") or (digest is not None and digest.hexdigest() != found[1]):
        raise CorruptCheckpointError(f"{src} changed while it was copied ({rel}: its bytes no longer match "
                                     "metadata.json); nothing was copied")
    return size
