"""`copy CKPT DEST`: a verified copy of one checkpoint that depends on nothing else."""
from __future__ import annotations

from ..copying import copy_checkpoint
from ..storage import open_storage
from .common import EXIT_OK, checkpoint_arg, subparser
from .table import human_bytes

EPILOG = """examples:
  dcp-resume copy runs/exp1/step_500 /archive/exp1_step_500
  dcp-resume copy runs/exp1/step_500 s3://bucket/exp1/step_500 --storage-options '{"profile": "archive"}'

Streams every file metadata.json lists, checking each against its recorded content hash, and writes
metadata.json last: DEST is then a complete checkpoint on its own (files an incremental checkpoint shares
with earlier ones arrive as plain files), or, on any failure, absent. DEST must not exist. --storage-options
apply to whichever of CKPT and DEST is a URL. A plain `cp -r` of a checkpoint directory is complete too;
this adds the verification and works across stores.
"""


def register(sub) -> None:
    p = subparser(sub, "copy", "copy one checkpoint, verified, so that it depends on nothing else", EPILOG)
    p.add_argument("path", metavar="CKPT")
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(run=run)


def run(args) -> int:
    path = checkpoint_arg(args.store, args.path)
    dest_options = args.storage_options if open_storage(args.dest).remote else None
    copied = copy_checkpoint(args.store, path, open_storage(args.dest, dest_options), args.dest)
    print(f"Copied {path} to {args.dest} ({human_bytes(copied)}, every file verified against metadata.json)")
    return EXIT_OK
