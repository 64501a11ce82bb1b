"""The s3:// side of ObjectStore (boto3, imported on first use): list, read, write, check, delete.

Failures come back as the store's errors: ObjectNotFound, ObjectUnreadable when retrying
cannot help (one error row), ObjectExists for a lost create-only race, StorageError for the
rest (the shard fails and is retried).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import cached_property

from orchestrator.config import Settings
from orchestrator.errors import ObjectExists, ObjectNotFound, ObjectTooLarge, ObjectUnreadable, StorageError

# What S3 answers for an object that no retry will make readable; everything else (5xx,
# throttling, timeouts) stays a StorageError, which fails the shard so that it is retried.
_S3_UNREADABLE = {
    "AccessDenied": "access denied (403): the workers' credentials may not read it",
    "AllAccessDisabled": "access to it is disabled",
    "InvalidObjectState": "archived (InvalidObjectState): restore it from Glacier/Deep Archive first",
    "AccountProblem": "the bucket owner's account cannot serve it",
}


def s3_split(uri: str) -> tuple[str, str]:
    """(bucket, key) exactly as written: no URL parsing, so `#`, `?`, `%` stay in the key."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _read_error(uri: str, error) -> StorageError:
    """A botocore ClientError of a GET as ObjectUnreadable (one error row) or StorageError (retry)."""
    details = error.response.get("Error", {})
    code = str(details.get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _S3_UNREADABLE:
        return ObjectUnreadable(f"{uri} cannot be read: {_S3_UNREADABLE[code]}")
    if code.startswith("KMS.") and not code.endswith(("ThrottlingException", "InternalException")):
        return ObjectUnreadable(f"{uri} cannot be read: its KMS key refused decryption ({code})")
    if code == "NoSuchKey" or status == 404:
        return ObjectNotFound(f"{uri} does not exist")
    if status == 403:
        return ObjectUnreadable(f"{uri} cannot be read: forbidden (403 {code})")
    return StorageError(f"cannot read {uri}: {error}")


class S3Objects:
    """Objects under s3:// URIs through one boto3 client (thread-safe, created on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def client(self):  # boto3 is imported lazily: file:// users never pay for it
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

    def list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(uri, size, etag) of every object under `prefix`, sorted by key, following pagination."""
        bucket, key_prefix = s3_split(prefix)
        if key_prefix and not key_prefix.endswith("/"):
            key_prefix += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    yield f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"')
        except self.client.exceptions.NoSuchBucket as e:
            raise ObjectNotFound(f"bucket {bucket!r} does not exist") from e
        except Exception as e:
            raise StorageError(f"cannot list {prefix}: {e}") from e

    def read(self, uri: str, max_bytes: int | None) -> bytes:
        # boto3 retries a request that fails, but not a body that breaks off after the headers
        # (a reset or a short read mid-stream): for those the whole GET is made again.
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        attempt = 1
        while True:
            try:
                return self._get(uri, max_bytes)
            except (HTTPClientError, IncompleteReadError) as e:
                if attempt >= self.settings.s3_max_attempts:
                    raise StorageError(f"cannot read {uri}: the body broke off {attempt} times ({e})") from e
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
            attempt += 1

    def _get(self, uri: str, max_bytes: int | None) -> bytes:
        bucket, key = s3_split(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except self.client.exceptions.NoSuchKey as e:
            raise ObjectNotFound(f"{uri} does not exist") from e
        except self.client.exceptions.ClientError as e:
            raise _read_error(uri, e) from e
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

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object: one ranged GET (HTTP Range), retried like `read`."""
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        if length <= 0:
            return b""
        bucket, key = s3_split(uri)
        attempt = 1
        while True:
            try:
                response = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
                with response["Body"] as body:
                    return body.read()
            except (HTTPClientError, IncompleteReadError) as e:
                if attempt >= self.settings.s3_max_attempts:
                    raise StorageError(f"cannot read {uri}: the body broke off {attempt} times ({e})") from e
            except self.client.exceptions.NoSuchKey as e:
                raise ObjectNotFound(f"{uri} does not exist") from e
            except self.client.exceptions.ClientError as e:
                raise _read_error(uri, e) from e
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
            attempt += 1

    def head(self, uri: str) -> tuple[int, str]:
        """(size, etag) of one object (HEAD)."""
        bucket, key = s3_split(uri)
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except self.client.exceptions.ClientError as e:
            raise _read_error(uri, e) from e
        return int(response["ContentLength"]), response["ETag"].strip('"')

    def write(self, uri: str, data: bytes, if_absent: bool) -> None:
        bucket, key = s3_split(uri)
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExists(f"{uri} already exists") from e
            raise StorageError(f"cannot write {uri}: {e}") from e
        except Exception as e:
            raise StorageError(f"cannot write {uri}: {e}") from e

    def exists(self, uri: str) -> bool:
        bucket, key = s3_split(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check {uri}: {e}") from e

    def delete(self, uri: str) -> None:
        bucket, key = s3_split(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise StorageError(f"cannot delete {uri}: {e}") from e
