"""Where synray reads and writes: local paths and cloud URIs (s3://, gs://, file://) through one pyarrow.fs layer.

A `Location` is a filesystem and a path in it, plus the string the user wrote, so that messages and
Ray Data reads use the user's own spelling. Writes are atomic on every filesystem: the bytes go to a
temporary name and are moved into place (a rename on a local disk; on an object store a server-side
copy, so an object appears whole or not at all). Credentials never pass through synray: pyarrow reads
them from the environment (or the instance's role) of the process that needs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["Location", "is_uri", "TMP_PREFIX", "copy_tree", "fsync_dir", "local_copy", "local_file"]

#: names that writers own until they move them into place; readers never list them
TMP_PREFIX = ".tmp-"


def is_uri(where: str | os.PathLike) -> bool:
    """Whether a path is a URI (s3://bucket/key, gs://, file://...) rather than a local path."""
    return "://" in str(where)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in a local directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: URI schemes whose path pyarrow derives from the URI alone (bucket/key; an absolute path for file://)
_PLAIN_SCHEMES = ("s3", "gs", "gcs", "file")


@dataclass(frozen=True)
class Location:
    """A file or directory on a local disk or in an object store. The filesystem is resolved on first use (for
    an object store that asks the network), and shared with every location joined from this one."""

    uri: str                 # as the user wrote it: an absolute local path, or the URI with its query
    _fs: list = field(default_factory=list, compare=False, repr=False)   # [the resolved filesystem], once known

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = str(where)
        if is_uri(text):
            base, sep, query = text.partition("?")
            return cls(base.rstrip("/") + sep + query)
        return cls(str(Path(text).expanduser().absolute()), [pafs.LocalFileSystem()])

    @property
    def fs(self) -> pafs.FileSystem:
        if not self._fs:
            self._fs.append(pafs.FileSystem.from_uri(self.uri)[0])
        return self._fs[0]

    @property
    def path(self) -> str:
        """The path inside `fs`."""
        if not is_uri(self.uri):
            return self.uri
        scheme, rest = self.uri.split("://", 1)
        if scheme in _PLAIN_SCHEMES:
            return rest.partition("?")[0].rstrip("/") or "/"
        return pafs.FileSystem.from_uri(self.uri)[1]

    # ------------------------------------------------------------------ naming
    def join(self, *parts: str) -> Location:
        base, sep, query = self.uri.partition("?")
        suffix = "/".join(parts)
        return Location(f"{base.rstrip('/')}/{suffix}{sep}{query}", self._fs)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri) or self.uri.startswith("file://")

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ looking
    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def children(self, prefix: str = "", suffix: str = "") -> list[Location]:
        """Entries directly inside this directory whose names start and end as given, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.base_name.startswith(prefix) and i.base_name.endswith(suffix))
        return [self.join(n) for n in names]

    # ------------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    # ------------------------------------------------------------------ writing
    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: under a temporary name beside it, then moved into place."""
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{self.name}"
        try:
            if self.is_local:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                fsync_dir(parent)
            else:
                _put(self.fs, tmp, data)
                _move(self.fs, tmp, self.path)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        _delete_quietly(self.fs, self.path)

    def walk_files(self) -> Iterator[Location]:
        """Every file below this directory."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                yield self.join(info.path[len(self.path) + 1:])


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _move(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """A server-side copy on object stores: `dest` appears whole, or not at all."""
    fs.move(src, dest)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def copy_tree(src: str | os.PathLike | Location, dst: str | os.PathLike | Location) -> None:
    """Copy a directory tree between any two locations (local <-> object store), file by file, each atomically."""
    src, dst = Location.of(src), Location.of(dst)
    dst.mkdir()
    if src.is_local and dst.is_local:
        shutil.copytree(src.path, dst.path, dirs_exist_ok=True)
        return
    for f in src.walk_files():
        dst.join(f.path[len(src.path) + 1:]).write_bytes(f.read_bytes())


def local_copy(where: str | os.PathLike) -> str:
    """A directory as a local path: itself, or (a URI) a fresh download of it, for loaders that read local files
    (transformers' from_pretrained)."""
    if not is_uri(where):
        return str(where)
    dest = tempfile.mkdtemp(prefix="synray-download-")
    copy_tree(where, dest)
    return dest


@contextlib.contextmanager
def local_file(where: str | os.PathLike | Location) -> Iterator[str]:
    """A file as a local path while the block runs: itself, or (under a URI) a temporary download of it."""
    where = Location.of(where)
    if where.is_local:
        yield where.path
        return
    with tempfile.NamedTemporaryFile(suffix=f"-{where.name}") as f:
        f.write(where.read_bytes())
        f.flush()
        yield f.name
