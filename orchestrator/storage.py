"""ObjectStore: one API over file:// (the embedded default) and s3:// (boto3).

Every location is a full URI; the store picks the backend by scheme, so a job
may read from S3 and write to a local directory or the other way round.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from orchestrator.config import Settings
from orchestrator.errors import ObjectNotFound, ObjectTooLarge, StorageError, UnsafeKey


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str


def normalize_uri(location: str) -> str:
    """A local path or file:// or s3:// location -> a canonical URI (local paths made absolute)."""
    if location.startswith("s3://"):
        parsed = urlparse(location)
        if not parsed.netloc:
            raise StorageError(f"malformed S3 URI {location!r}: expected s3://bucket/prefix")
        return location
    if location.startswith("s3:") and not location.startswith("s3://"):
        raise StorageError(f"malformed S3 URI {location!r}: expected s3://bucket/prefix")
    if location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            # file://out/run1 would otherwise silently become /run1.
            raise StorageError(
                f"file URI {location!r} names host {parsed.netloc!r}: write file:///absolute/path or a plain path"
            )
        location = unquote(parsed.path)
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


def _local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _s3_split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


_PARTIAL_SUFFIX = ".vitbatch-partial"


def _is_partial_write(name: str) -> bool:
    """A temporary file of `ObjectStore.write`, renamed into place once complete."""
    return name.startswith(".") and name.endswith(_PARTIAL_SUFFIX)


def _walk_sorted(directory: Path) -> Iterator[Path]:
    """Files under `directory` in full-key order, as S3 lists them: 'a-b' < 'a.png' < 'a/x'.

    os.walk yields a folder's files before its subfolders, which is not key order.
    Symlinked folders are not followed (as os.walk does not).
    """
    with os.scandir(directory) as entries:
        named = [(entry.name + "/" if entry.is_dir() else entry.name, entry) for entry in entries]
    for _, entry in sorted(named, key=lambda pair: pair[0]):
        if not entry.is_dir():
            yield Path(entry.path)
        elif not entry.is_symlink():
            yield from _walk_sorted(Path(entry.path))


class ObjectStore:
    """Read, write and list objects by URI. Thread-safe; one per process is enough."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()

    @cached_property
    def _s3(self):  # boto3 is imported lazily: file:// users never pay for it
        import boto3
        from botocore.config import Config

        # 'standard' retries cover 500/503 SlowDown, throttling, timeouts and resets with
        # backoff; keepalive stops idle NATs from silently dropping long-lived connections.
        config = Config(
            retries={"mode": "standard", "max_attempts": self.settings.s3_max_attempts},
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
            max_pool_connections=64,
        )
        return boto3.session.Session().client("s3", endpoint_url=self.settings.s3_endpoint_url, config=config)

    # -- listing ---------------------------------------------------------------------------
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, sorted by key, following pagination."""
        if prefix.startswith("s3://"):
            yield from self._list_s3(prefix)
        else:
            yield from self._list_local(prefix)

    def _list_local(self, prefix: str) -> Iterator[ObjectInfo]:
        root = _local_path(prefix)
        if not root.is_dir():
            raise ObjectNotFound(f"input directory {root} does not exist")
        for path in _walk_sorted(root):
            if _is_partial_write(path.name):
                continue  # another writer's object, not there until its os.replace
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed (or renamed into place) since the listing
                continue
            yield ObjectInfo(
                uri="file://" + quote(str(path)),
                size=stat.st_size,
                etag=f"{stat.st_mtime_ns:x}-{stat.st_size:x}",
            )

    def _list_s3(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key_prefix = _s3_split(prefix)
        if key_prefix and not key_prefix.endswith("/"):
            key_prefix += "/"
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        uri=f"s3://{bucket}/{obj['Key']}", size=obj["Size"], etag=obj["ETag"].strip('"')
                    )
        except self._s3.exceptions.NoSuchBucket as e:
            raise ObjectNotFound(f"bucket {bucket!r} does not exist") from e
        except Exception as e:
            raise StorageError(f"cannot list {prefix}: {e}") from e

    # -- objects ---------------------------------------------------------------------------
    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ObjectTooLarge before downloading anything over `max_bytes`."""
        if uri.startswith("s3://"):
            return self._read_s3(uri, max_bytes)
        path = _local_path(uri)
        try:
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(f"object is {size} bytes, over the cap of {max_bytes}")
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(f"{uri} does not exist") from e

    def _read_s3(self, uri: str, max_bytes: int | None) -> bytes:
        # boto3 retries a request that fails, but not a body that breaks off after the headers
        # (a reset or a short read mid-stream): for those the whole GET is made again.
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        attempt = 1
        while True:
            try:
                return self._get_s3(uri, max_bytes)
            except (HTTPClientError, IncompleteReadError) as e:
                if attempt >= self.settings.s3_max_attempts:
                    raise StorageError(f"cannot read {uri}: the body broke off {attempt} times ({e})") from e
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
            attempt += 1

    def _get_s3(self, uri: str, max_bytes: int | None) -> bytes:
        bucket, key = _s3_split(uri)
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
        except self._s3.exceptions.NoSuchKey as e:
            raise ObjectNotFound(f"{uri} does not exist") from e
        except Exception as e:
            raise StorageError(f"cannot read {uri}: {e}") from e
        body = response["Body"]
        if max_bytes is not None and response["ContentLength"] > max_bytes:
            body.close()
            raise ObjectTooLarge(f"object is {response['ContentLength']} bytes, over the cap of {max_bytes}")
        try:
            return body.read()
        finally:
            body.close()

    def write(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        if uri.startswith("s3://"):
            bucket, key = _s3_split(uri)
            try:
                self._s3.put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as e:
                raise StorageError(f"cannot write {uri}: {e}") from e
            return
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            bucket, key = _s3_split(uri)
            try:
                self._s3.head_object(Bucket=bucket, Key=key)
                return True
            except self._s3.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise StorageError(f"cannot check {uri}: {e}") from e
        return _local_path(uri).is_file()

    def delete(self, uri: str) -> None:
        """Remove an object; a missing one is not an error."""
        if uri.startswith("s3://"):
            bucket, key = _s3_split(uri)
            try:
                self._s3.delete_object(Bucket=bucket, Key=key)
            except Exception as e:
                raise StorageError(f"cannot delete {uri}: {e}") from e
            return
        _local_path(uri).unlink(missing_ok=True)

    def is_prefix(self, uri: str) -> bool:
        """True when `uri` names a directory (file://) or a non-empty key prefix (s3://)."""
        if uri.startswith("s3://"):
            return next(iter(self._list_s3(uri)), None) is not None
        return _local_path(uri).is_dir()

    def download_prefix(self, prefix: str, dest: Path) -> Path:
        """Copy every object under `prefix` into `dest` (for model directories)."""
        for info in self.list(prefix):
            target = dest / relative_key(prefix, info.uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(info.uri))
        return dest
