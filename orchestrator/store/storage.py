"""ObjectStore: one API over file:// (the embedded default) and s3:// (boto3).

Every location is a full URI; the store picks the backend by scheme, so a job
may read from S3 and write to a local directory or the other way round. The local
side's details live in localfs.py, the S3 side in s3.py.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from orchestrator.config import Settings
from orchestrator.errors import ObjectExists, ObjectNotFound, StorageError, UnsafeKey
from orchestrator.store.localfs import (
    PARTIAL_SUFFIX,
    current_umask,
    fsync_dir,
    is_partial_write,
    local_path,
    read_local,
    read_local_range,
    relative_path,
    walk_sorted,
)
from orchestrator.store.s3 import S3Objects


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str


def normalize_uri(location: str) -> str:
    """A local path or file:// or s3:// location -> a canonical URI (local paths made absolute).

    Nothing here URL-parses: `#`, `?` and `%` are ordinary characters of an S3 key (urlparse
    would cut `s3://b/a#1.png` at the `#`). file:// URIs are percent-decoded, nothing more.
    """
    if location.startswith("s3://"):
        if not location[len("s3://"):].split("/", 1)[0]:
            raise StorageError(f"malformed S3 URI {location!r}: expected s3://bucket/prefix")
        return location
    if location.startswith("s3:") and not location.startswith("s3://"):
        raise StorageError(f"malformed S3 URI {location!r}: expected s3://bucket/prefix")
    if location.startswith("file://"):
        host, slash, path = location[len("file://"):].partition("/")
        if host not in ("", "localhost"):
            # file://out/run1 would otherwise silently become /run1.
            raise StorageError(
                f"file URI {location!r} names host {host!r}: write file:///absolute/path or a plain path"
            )
        location = unquote(slash + path)
    elif "://" in location:
        raise StorageError(f"unsupported URI scheme in {location!r}: use a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(location))
    trailing = "/" if location.endswith("/") and path != "/" else ""
    return "file://" + quote(path) + trailing


def join(prefix: str, *parts: str) -> str:
    """Join relative key parts under a prefix URI, refusing anything that would escape it."""
    out = prefix.rstrip("/")
    for part in parts:
        for segment in part.split("/"):
            if segment in ("", ".", "..") or "\\" in segment or "\x00" in segment:
                raise UnsafeKey(f"unsafe key segment {segment!r} in {part!r}: keys must stay under {prefix}")
            out += "/" + (quote(segment) if prefix.startswith("file://") else segment)
    return out


def relative_key(prefix: str, uri: str) -> str:
    """The part of `uri` under `prefix` (both canonical), as a plain key."""
    base = prefix.rstrip("/") + "/"
    if not uri.startswith(base):
        raise UnsafeKey(f"{uri} is not under {prefix}")
    rel = uri[len(base):]
    return unquote(rel) if uri.startswith("file://") else rel


class ObjectStore:
    """Read, write and list objects by URI. Thread-safe; one per process is enough, built at the
    edge (a command, a task's context, a test) from the Settings it was given."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._s3 = S3Objects(self.settings)

    # -- listing ---------------------------------------------------------------------------
    def list(self, prefix: str, skipped: list[str] | None = None) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, sorted by key, following pagination.

        Local entries that are not listed (links out of the prefix, loops, FIFOs, sockets,
        devices, entries that cannot be examined) are appended to `skipped` as "key: why".
        """
        if prefix.startswith("s3://"):
            yield from (ObjectInfo(uri, size, etag) for uri, size, etag in self._s3.list(prefix))
        else:
            yield from self._list_local(prefix, [] if skipped is None else skipped)

    def _list_local(self, prefix: str, skipped: builtins.list[str]) -> Iterator[ObjectInfo]:
        root = local_path(prefix)
        if not root.is_dir():
            raise ObjectNotFound(f"input directory {root} does not exist")
        top = root.stat()
        passed: builtins.list[tuple[Path, str]] = []
        for path, info in walk_sorted(root, str(root), passed, frozenset({(top.st_dev, top.st_ino)})):
            if is_partial_write(path.name):
                continue  # another writer's object, not there until its os.replace
            yield ObjectInfo(
                uri="file://" + quote(str(path)),
                size=info.st_size,
                etag=f"{info.st_mtime_ns:x}-{info.st_size:x}",
            )
        skipped.extend(f"{relative_path(root, p)}: {why}" for p, why in passed)

    # -- objects ---------------------------------------------------------------------------
    def read(self, uri: str, max_bytes: int | None = None, *, within: str | None = None) -> bytes:
        """The object's bytes; ObjectTooLarge before downloading anything over `max_bytes`.

        ObjectUnreadable when retrying cannot help (permission denied, archived, a loop, a
        name too long, not a regular file). `within`: a local file must really lie under this
        prefix, checked on the opened file itself, so a symlink swapped in after planning
        cannot lead the read out of the input.
        """
        if uri.startswith("s3://"):
            return self._s3.read(uri, max_bytes)
        return read_local(uri, max_bytes, within)

    def read_range(self, uri: str, start: int, length: int, *, within: str | None = None) -> bytes:
        """Bytes [start, start + length) of the object (fewer at its end): an S3 Range GET, a local pread.

        What parquet inputs read with: a footer, then one row group's column chunks, never the
        whole object. Errors as `read`'s.
        """
        if uri.startswith("s3://"):
            return self._s3.read_range(uri, start, length)
        return read_local_range(uri, start, length, within)

    def info(self, uri: str) -> ObjectInfo:
        """One object's size and etag (as a listing gives them); ObjectNotFound when it is not there."""
        if uri.startswith("s3://"):
            return ObjectInfo(uri, *self._s3.head(uri))
        try:
            info = local_path(uri).stat()
        except OSError as e:
            raise ObjectNotFound(f"{uri} does not exist") from e
        return ObjectInfo(uri, info.st_size, f"{info.st_mtime_ns:x}-{info.st_size:x}")

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part.

        `if_absent`: create only; ObjectExists when the object is already there (S3's
        conditional `If-None-Match: *`, a hard link locally: both atomic across writers).
        Local files are fsynced with their folder before this returns, so a commit marker
        written next never survives a crash that its part did not.
        """
        if uri.startswith("s3://"):
            self._s3.write(uri, data, if_absent)
            return
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared files
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError as e:
                    raise ObjectExists(f"{uri} already exists") from e
                finally:
                    Path(tmp).unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            return self._s3.exists(uri)
        return local_path(uri).is_file()

    def delete(self, uri: str) -> None:
        """Remove an object; a missing one is not an error."""
        if uri.startswith("s3://"):
            self._s3.delete(uri)
            return
        local_path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix` (a local folder: the folder itself, links not followed)."""
        if prefix.startswith("s3://"):
            for uri, _, _ in list(self._s3.list(prefix)):
                self._s3.delete(uri)
            return
        path = local_path(prefix)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
