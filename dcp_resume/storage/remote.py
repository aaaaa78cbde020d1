"""The fsspec backend: a save_dir given as a URL (s3://, gs://, memory://, file://, ...).

An object store has no atomic rename and no fsync, and none is needed: an object appears whole when its
PUT completes, or not at all. So metadata.json, PUT last and alone by rank 0 after every rank's shards are
uploaded, is the commit, exactly as on a local disk (Orbax's commit-file approach). "Directories" are key
prefixes: one exists while any object lives under it.

Filesystems are opened without fsspec's listings cache: another rank or job changes the store under us, and a
stale listing would hide a commit or show a deleted checkpoint. DCP's own FsspecWriter/Reader get the same
options.
"""
from __future__ import annotations

import posixpath
from typing import Any, BinaryIO, Iterable

from fsspec.core import url_to_fs

from ..compat import FsspecReader, FsspecWriter
from ..errors import StorageError
from .base import Storage

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2"}  # protocols with buckets


class FsspecStorage(Storage):
    """Storage through one fsspec filesystem instance (fsspec caches instances per protocol + options)."""

    remote = True

    def __init__(self, url: str, options: dict[str, Any]):
        self.options = {"use_listings_cache": False, **options}
        try:
            self.fs, _ = url_to_fs(url, **self.options)
        except (ValueError, ImportError) as e:
            raise StorageError(f"save_dir {url}: cannot open this URL ({e}). Known schemes include s3://, gs://, "
                               "memory:// and file://; s3:// needs `pip install s3fs`, gs:// `pip install gcsfs`"
                               ) from None
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]

    def _strip(self, path: str) -> str:
        return self.fs._strip_protocol(path).rstrip("/")

    def identity(self, path: str) -> str:
        return f"{self.protocol}://{self._strip(path)}"

    def absolute(self, path: str) -> str:
        return path

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        return self.fs.isfile(path)

    def listdir(self, path: str, dirs_only: bool = False) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self._strip(path)
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                      if (not dirs_only or e.get("type") == "directory") and e["name"].rstrip("/") != base)

    def file_sizes(self, root: str) -> dict[str, int] | None:
        found = self.fs.find(root, detail=True)
        if not found:
            return None
        base = self._strip(root) + "/"
        return {name[len(base):]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(base) and info.get("type") != "directory"}

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def is_link(self, path: str) -> bool:
        return False  # object stores have no links

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, an OSError instead of reading more than limit bytes."""
        data = self.fs.cat_file(path) if limit is None else self.fs.cat_file(path, start=0, end=limit + 1)
        if limit is not None and len(data) > limit:
            raise OSError(f"{path} is larger than {limit} bytes, which no file of this kind is: damage, "
                          "not read")
        return data

    def write_durably(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one PUT: durable when it returns

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> None:
        with self.fs.open(path, "wb") as f:  # a multipart upload: the object appears when it is closed
            for chunk in chunks:
                f.write(chunk)

    def commit_atomically(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # an object PUT is atomic: readers see the whole object or none

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional create where the backend has one (S3: If-None-Match: *; memory://); other fsspec
        backends check-then-write, which is best-effort (two writers racing within one round trip can both
        win)."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def renew(self, path: str, data: bytes) -> None:
        """An object's modification time changes only with a new PUT: of the same data, if the object still
        holds it (check-then-write: best effort, so a renewal may race another writer's takeover)."""
        if self.fs.cat_file(path) == data:
            self.fs.pipe_file(path, data)

    def sync_dir(self, path: str) -> None:
        """Nothing to sync: an object store has no directory entries."""

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def remove_file(self, path: str) -> None:
        self.fs.rm(path)

    def link(self, src: str, dst: str) -> None:
        """A server-side copy (S3 CopyObject): no byte passes through this host."""
        self.fs.copy(src, dst)

    def file_identity(self, path: str) -> str:
        """The object's URL: every object is its own copy (a link here is a server-side copy)."""
        return self.identity(path)

    def mtime(self, path: str) -> float:
        return self.fs.modified(path).timestamp()

    def free_bytes(self, path: str) -> int | None:
        """Unknown for object stores (and effectively unbounded): the low-disk guard does not apply."""
        return None

    def file_signature(self, root: str, rels: list[str]) -> tuple[Any, ...] | None:
        """Size plus whatever the store says changes on a rewrite (ETag, modification time)."""
        try:
            out = []
            for rel in rels:
                info = self.fs.info(posixpath.join(root, rel))
                out.append((rel, info.get("size"), str(info.get("ETag") or info.get("etag") or ""),
                            str(info.get("LastModified") or info.get("mtime") or info.get("created") or "")))
            return tuple(out)
        except OSError:
            return None

    def check_reachable(self, path: str) -> None:
        """Fail early, naming the URL, when the bucket does not exist or the endpoint cannot be reached."""
        if self.protocol not in OBJECT_STORES:
            return
        bucket = self._strip(path).split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception as e:  # endpoint down, DNS, credentials: botocore raises many kinds
            raise StorageError(f"save_dir {path}: cannot reach {self.protocol}://{bucket} ({type(e).__name__}: "
                               f"{e}). Check the endpoint (AWS_ENDPOINT_URL or storage_options) and the "
                               "credentials") from None
        if not found:
            raise StorageError(f"save_dir {path}: bucket {bucket} does not exist or these credentials cannot see "
                               f"it. Create it first (e.g. `aws s3 mb {self.protocol}://{bucket}`) or fix the URL")

    def check_writable(self, save_dir: str) -> None:
        """An object store needs no directory made up front; the bucket must exist and be reachable."""
        self.check_reachable(save_dir)

    def dcp_writer(self, state_dir: str):
        """DCP's FsspecWriter, without DCP's fsync: an object is durable when its upload returns (DCP would fall
        back to a machine-wide os.sync() per file)."""
        return FsspecWriter(state_dir, sync_files=False, **self.options)

    def dcp_reader_class(self) -> tuple[type, dict[str, Any]]:
        return FsspecReader, dict(self.options)
