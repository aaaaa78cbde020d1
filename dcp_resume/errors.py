"""The few exception types the engine raises. Each subclasses a built-in, so callers may catch either."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for: an empty save_dir, a missing path, a missing state/."""


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory that was never committed (no valid metadata.json) or lost files since."""


class CheckpointMismatchError(ValueError):
    """The live objects handed to load_checkpoint do not match what the checkpoint holds."""


class CheckpointExistsError(FileExistsError):
    """A save would overwrite a committed checkpoint."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the previous checkpoint stays the latest."""


class RankFailureError(RuntimeError):
    """A collective outside a save (a gradient sync) failed: another rank died or hung past its timeout."""


class CorruptCheckpointError(ValueError):
    """A committed checkpoint whose files no longer match the content hashes metadata.json records."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holding a pickled object that could run code when loaded; nothing of it is loaded."""


class SaveDirLockedError(FileExistsError):
    """Another live process holds the save_dir's lock file: one writer per save_dir."""


class StorageError(OSError):
    """A save_dir URL that cannot be used: unknown scheme, missing bucket, unreachable endpoint."""
