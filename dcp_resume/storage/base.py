"""What every storage backend offers: primitives each backend implements, and the helpers built on them."""
from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Hashable, Iterable

JSON_LIMIT = 64 << 20  # metadata.json, config.json, training_stats.json: small files; a bigger one is damage


class Storage:
    """One save_dir's storage: the local filesystem or an fsspec URL, made once by `open_storage`.

    Methods take full paths (a plain path, or a URL under the store's root) so that a checkpoint's path is
    the same string in logs, errors and metadata. Subclasses implement the primitives; the JSON helpers and
    listings below are shared. `remote` says whether paths are URLs (no free-space figure, no links)."""

    remote = False

    # -- primitives (every backend) -------------------------------------------------------------------
    def identity(self, path: str) -> str: raise NotImplementedError
    def exists(self, path: str) -> bool: raise NotImplementedError
    def isdir(self, path: str) -> bool: raise NotImplementedError
    def isfile(self, path: str) -> bool: raise NotImplementedError
    def is_link(self, path: str) -> bool: raise NotImplementedError
    def listdir(self, path: str, dirs_only: bool = False) -> list[str]: raise NotImplementedError
    def file_sizes(self, root: str) -> dict[str, int] | None: raise NotImplementedError
    def makedirs(self, path: str) -> None: raise NotImplementedError
    def open_read(self, path: str) -> BinaryIO: raise NotImplementedError
    def read_bytes(self, path: str, limit: int | None = None) -> bytes: raise NotImplementedError
    def write_durably(self, path: str, data: bytes) -> None: raise NotImplementedError
    def write_stream(self, path: str, chunks: Iterable[bytes]) -> None: raise NotImplementedError
    def commit_atomically(self, path: str, data: bytes) -> None: raise NotImplementedError
    def create_exclusive(self, path: str, data: bytes) -> bool: raise NotImplementedError
    def renew(self, path: str, data: bytes) -> None: raise NotImplementedError  # a new mtime for a lease
    def sync_dir(self, path: str) -> None: raise NotImplementedError
    def remove_tree(self, path: str) -> None: raise NotImplementedError
    def remove_file(self, path: str) -> None: raise NotImplementedError
    def mtime(self, path: str) -> float: raise NotImplementedError
    def free_bytes(self, path: str) -> int | None: raise NotImplementedError
    def file_signature(self, root: str, rels: list[str]) -> tuple | None: raise NotImplementedError
    def check_writable(self, save_dir: str) -> None: raise NotImplementedError
    def check_reachable(self, path: str) -> None: raise NotImplementedError
    def dcp_writer(self, state_dir: str): raise NotImplementedError
    def dcp_reader_class(self) -> tuple[type, dict[str, Any]]: raise NotImplementedError
    def absolute(self, path: str) -> str: raise NotImplementedError
    def link(self, src: str, dst: str) -> None: raise NotImplementedError
    def file_identity(self, path: str) -> Hashable: raise NotImplementedError  # equal iff one copy of the bytes

    # -- shared helpers -------------------------------------------------------------------------------
    @staticmethod
    def basename(path: str) -> str:
        return os.path.basename(os.fspath(path).rstrip("/"))

    def list_files(self, root: str) -> list[str]:
        """Relative paths of every regular file under root, sorted."""
        return sorted(self.file_sizes(root) or {})

    def read_json(self, path: str) -> Any:
        """A small JSON file, at most JSON_LIMIT bytes. Damage (too big, not JSON, nested past Python's
        recursion limit) raises ValueError or OSError, never RecursionError or MemoryError."""
        data = self.read_bytes(path, limit=JSON_LIMIT)
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError(f"{path} nests deeper than any real metadata; it is damaged") from None

    def write_json_durably(self, path: str, obj: Any) -> None:
        self.write_durably(path, json_bytes(obj))

    def commit_json_atomically(self, path: str, obj: Any) -> None:
        """Readers see the old file or the new one, never a part (rename locally, a single PUT remotely)."""
        self.commit_atomically(path, json_bytes(obj))

    def signature(self, root: str, rels: list[str]) -> tuple | None:
        """Something that changes whenever one of the files is rewritten; None if one is missing."""
        sig = self.file_signature(root, rels)
        return None if sig is None else (self.identity(root), sig)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
