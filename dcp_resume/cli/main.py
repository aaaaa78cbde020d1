"""dcp-resume: look at, check, export and prune the checkpoints of a save_dir without starting training.

Works in a plain shell: no torch.distributed, no GPU, nothing written except by `export --out`, `copy` and
`prune`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from .. import errors
from ..export import ExportError
from . import copy, export, inspect, ls, prune, verify
from ..storage import open_storage
from .common import EXIT_FAILED, EXIT_USAGE, Parser, UsageError

EPILOG = """examples:
  dcp-resume ls runs/exp1                  every checkpoint: complete or not, size, best, which one resume loads
  dcp-resume latest runs/exp1              the path --auto_resume would use (exit 1 if none)
  dcp-resume verify runs/exp1              sizes, content hashes and DCP shard coverage of every checkpoint
  dcp-resume inspect runs/exp1/step_500    metadata, config highlights, state keys with shape/dtype/bytes
  dcp-resume export runs/exp1/step_500 --out model.safetensors --dtype bf16
  dcp-resume copy runs/exp1/step_500 /archive/step_500   a verified copy that depends on nothing else
  dcp-resume prune runs/exp1 --keep 3 --dry-run

exit codes:
  0  ok
  1  check failed or nothing found (a corrupt checkpoint, no checkpoint to resume, a locked save_dir)
  2  usage error (a missing path, a file where a directory is needed, a bad flag value)
"""

# -- the program --------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(prog="dcp-resume", description=__doc__, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (ls, verify, inspect, export, copy, prune):
        command.register(sub)
    return parser


@contextlib.contextmanager
def _engine_warnings_to_stderr():
    """The engine's warnings (`Skipping checkpoint ...: <file> content hash mismatch`) on stderr, in the CLI's
    format, for this call only: main() may run inside another program, whose logging stays as it was."""
    logger = logging.getLogger("dcp_resume")
    saved = logger.handlers[:], logger.propagate, logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dcp-resume: warning: %(message)s"))
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


FAILURES = (errors.CheckpointNotFoundError, errors.CheckpointExistsError, errors.IncompleteCheckpointError,
            errors.CorruptCheckpointError, errors.UnsafeCheckpointError, errors.SaveDirLockedError, ExportError, OSError)


def _open_storage(args) -> None:
    """args.store: the Storage of the path argument, with --storage-options; one clear usage error for options
    given with a local path, a bad scheme or a missing bucket."""
    target = args.save_dir if getattr(args, "save_dir", None) is not None else args.path
    try:
        args.store = open_storage(target)
        if args.storage_options is not None:
            dest = getattr(args, "dest", None)  # `copy` has a second path, which may be the URL
            if not args.store.remote and not (dest is not None and open_storage(dest).remote):
                raise UsageError(f"--storage-options apply to a URL (s3://...), not the local path {target}")
            if args.store.remote:
                args.store = open_storage(target, args.storage_options)
        args.store.check_reachable(target)
    except errors.StorageError as e:
        raise UsageError(str(e).replace("save_dir ", "", 1)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _open_storage(args)
        with _engine_warnings_to_stderr():
            return args.run(args)
    except BrokenPipeError:  # `dcp-resume ls ... | head`: the reader went away; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except UsageError as e:
        print(f"dcp-resume: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FAILURES as e:
        print(f"dcp-resume: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
