"""What every `dcp-resume` command shares: exit codes, the one-line usage error, the argument parser, and the
checks of path arguments (plain paths or URLs, through the command's Storage)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os

from .. import layout
from ..storage import Storage, options_from_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

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
    p.add_argument("--storage-options", type=options_from_json, metavar="JSON",
                   help="fsspec options for a URL path (s3://...), e.g. '{\"endpoint_url\": \"http://minio:9000\"}'; "
                        "credentials otherwise come from the environment (AWS_*)")
    return p


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1 (the newest N complete checkpoints "
                                         "stay; keeping none would remove the one to resume from)")
    return value


# -- argument paths (plain paths or URLs, through the command's Storage) -----------------------------------
def _directory(store: Storage, path: str, what: str, hint: str) -> str:
    if not store.exists(path):
        raise UsageError(f"{what} {path} does not exist; {hint}")
    if not store.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a directory; {hint}")
    return path


def is_checkpoint(store: Storage, path: str) -> bool:
    """A checkpoint directory (complete or not) rather than a save_dir."""
    return bool(layout.CHECKPOINT_NAME.match(store.basename(path))) or \
        store.isfile(os.path.join(path, layout.METADATA_FILE)) or store.isdir(os.path.join(path, layout.STATE_DIR))


def save_dir_arg(store: Storage, path: str) -> str:
    _directory(store, path, "SAVE_DIR", SAVE_DIR_HINT)
    if is_checkpoint(store, path):
        parent = path.rstrip("/").rpartition("/")[0] or "."
        raise UsageError(f"SAVE_DIR {path} is a checkpoint, not a save_dir; pass the directory that holds it "
                         f"({parent})")
    return path


def checkpoint_arg(store: Storage, path: str) -> str:
    _directory(store, path, "PATH", CHECKPOINT_HINT)
    if not is_checkpoint(store, path):
        newest = layout.latest_complete(store, path)
        if newest is None:
            raise UsageError(f"PATH {path} is not a checkpoint directory; {CHECKPOINT_HINT}")
        raise UsageError(f"PATH {path} is a save_dir, not a checkpoint; name one of its checkpoints, e.g. "
                         f"{newest.path} (`dcp-resume ls {path}` lists them)")
    return path


def any_dir_arg(store: Storage, path: str) -> str:
    return _directory(store, path, "PATH", "pass a checkpoint directory or a save_dir")


@contextlib.contextmanager
def engine_quiet():
    """For commands that report skipped checkpoints themselves (ls, prune), not as engine warnings."""
    logger = logging.getLogger("dcp_resume")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
