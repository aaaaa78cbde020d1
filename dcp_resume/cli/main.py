"""dcp-resume: look at, check, export and prune the checkpoints of a save_dir without starting training.

Works in a plain shell: no torch.distributed, no GPU, nothing written except by `export --out` and `prune`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from .. import errors, layout, storage
from ..export import ExportError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """examples:
  dcp-resume ls runs/exp1                  every checkpoint: complete or not, size, best, which one resume loads
  dcp-resume latest runs/exp1              the path --auto_resume would use (exit 1 if none)
  dcp-resume verify runs/exp1              sizes, content hashes and DCP shard coverage of every checkpoint
  dcp-resume inspect runs/exp1/step_500    metadata, config highlights, state keys with shape/dtype/bytes
  dcp-resume export runs/exp1/step_500 --out model.safetensors --dtype bf16
  dcp-resume prune runs/exp1 --keep 3 --dry-run

exit codes:
  0  ok
  1  check failed or nothing found (a corrupt checkpoint, no checkpoint to resume, a locked save_dir)
  2  usage error (a missing path, a file where a directory is needed, a bad flag value)
"""

SAVE_DIR_HINT = "pass the directory that holds the step_*/epoch* checkpoint directories"
CHECKPOINT_HINT = "pass one checkpoint directory, e.g. runs/exp1/step_500 (`dcp-resume ls SAVE_DIR` lists them)"


class UsageError(Exception):
    """A bad argument: reported as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line in the CLI's own format (still exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"dcp-resume: error: {message} (see `{self.prog} --help`)\n")


def subparser(sub, name: str, help: str, epilog: str) -> Parser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage-options", type=json_object, metavar="JSON",
                   help="fsspec options for a URL path (s3://...), e.g. '{\"endpoint_url\": \"http://minio:9000\"}'; "
                        "credentials otherwise come from the environment (AWS_*)")
    return p


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1 (the newest N complete checkpoints "
                                         "stay; keeping none would remove the one to resume from)")
    return value


# -- argument paths (plain paths or URLs, through storage) -------------------------------------------------
def _directory(path: str, what: str, hint: str) -> str:
    if not storage.exists(path):
        raise UsageError(f"{what} {path} does not exist; {hint}")
    if not storage.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a directory; {hint}")
    return path


def is_checkpoint(path: str) -> bool:
    """A checkpoint directory (complete or not) rather than a save_dir."""
    return bool(layout.CHECKPOINT_NAME.match(storage.basename(path))) or \
        storage.isfile(os.path.join(path, layout.METADATA_FILE)) or storage.isdir(os.path.join(path, layout.STATE_DIR))


def save_dir_arg(path: str) -> str:
    _directory(path, "SAVE_DIR", SAVE_DIR_HINT)
    if is_checkpoint(path):
        parent = path.rstrip("/").rpartition("/")[0] or "."
        raise UsageError(f"SAVE_DIR {path} is a checkpoint, not a save_dir; pass the directory that holds it "
                         f"({parent})")
    return path


def checkpoint_arg(path: str) -> str:
    _directory(path, "PATH", CHECKPOINT_HINT)
    if not is_checkpoint(path):
        newest = layout.latest_complete(path)
        if newest is None:
            raise UsageError(f"PATH {path} is not a checkpoint directory; {CHECKPOINT_HINT}")
        raise UsageError(f"PATH {path} is a save_dir, not a checkpoint; name one of its checkpoints, e.g. "
                         f"{newest.path} (`dcp-resume ls {path}` lists them)")
    return path


def any_dir_arg(path: str) -> str:
    return _directory(path, "PATH", "pass a checkpoint directory or a save_dir")


# -- the program --------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    from . import export, inspect, ls, prune, verify

    parser = Parser(prog="dcp-resume", description=__doc__, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (ls, verify, inspect, export, prune):
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


FAILURES = (errors.CheckpointNotFoundError, errors.IncompleteCheckpointError, errors.CorruptCheckpointError,
            errors.UnsafeCheckpointError, errors.SaveDirLockedError, ExportError, OSError)


def _open_storage(args) -> None:
    """A URL argument: its fsspec options, and one clear usage error for a bad scheme or a missing bucket."""
    target = getattr(args, "save_dir", None) or getattr(args, "path", None)
    if target is None or not storage.is_url(target):
        if args.storage_options is not None:
            raise UsageError(f"--storage-options apply to a URL (s3://...), not the local path {target}")
        return
    if args.storage_options is not None:
        storage.configure(target, args.storage_options)
    try:
        storage.check_reachable(target)
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
