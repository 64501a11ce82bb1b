"""Webdataset-style .tar inputs (also gzip-compressed: .tar.gz, .tgz): one object read for a thousand images.

A tar shard's image members become items keyed `<tar key>/<member name>`, in member
order, so a redelivered shard yields the same rows. Only regular files with image
suffixes count; members with unsafe names (absolute, `..`) are reported as error rows,
never extracted anywhere: bytes stay in memory. A second member of the same name is an
error row keyed `<tar key>/<member name>#2` (#3, ...), so no two rows share a key.

The archive is read as a stream (`r|*`), member after member, never decompressed whole,
and its uncompressed size is capped as its raw size is: a gzip bomb stops at the cap. A tar
that cannot be read at all (over a cap, corrupt, denied, outside the input) is one error row
under the tar's own key.
"""

from __future__ import annotations

import io
import tarfile
import zlib

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable
from orchestrator.manifest import Item
from orchestrator.planner import is_image_key
from orchestrator.storage import ObjectStore

UNSAFE = "unsafe member name (absolute or '..'): not read"
Blobs = dict[str, bytes | str]


def expand(tar_item: Item, store: ObjectStore, max_tar_bytes: int, max_member_bytes: int,
           within: str | None = None) -> tuple[list[Item], Blobs]:
    """(member items, uri -> bytes, or an error reason for members that are not read)."""
    try:
        data = store.read(tar_item.uri, max_bytes=max_tar_bytes, within=within)
        return _members(tar_item, data, max_tar_bytes, max_member_bytes)
    except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable) as e:
        return _whole_tar_error(tar_item, f"tar not read: {e}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # corrupt, truncated, bad gzip
        return _whole_tar_error(tar_item, f"not a readable tar archive ({type(e).__name__}: {e})")


def _whole_tar_error(tar_item: Item, reason: str) -> tuple[list[Item], Blobs]:
    item = Item(key=tar_item.key, uri=tar_item.uri, size=tar_item.size, etag=tar_item.etag)
    return [item], {item.uri: reason}


def _members(tar_item: Item, data: bytes, max_tar_bytes: int, max_member_bytes: int) -> tuple[list[Item], Blobs]:
    items: list[Item] = []
    blobs: Blobs = {}
    seen: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        for member in archive:
            if member.offset_data + member.size > max_tar_bytes:
                raise ObjectTooLarge(f"its uncompressed content passes the cap of {max_tar_bytes} bytes")
            if not member.isfile() or not is_image_key(member.name):
                continue
            seen[member.name] = seen.get(member.name, 0) + 1
            suffix = f"#{seen[member.name]}" if seen[member.name] > 1 else ""
            item = Item(key=f"{tar_item.key}/{member.name}{suffix}", uri=f"{tar_item.uri}#{member.name}{suffix}",
                        size=member.size, etag=f"{tar_item.etag}:{member.offset_data}")
            items.append(item)
            blobs[item.uri] = _member_bytes(archive, member, max_member_bytes, duplicate=bool(suffix))
    return items, blobs


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo, max_member_bytes: int,
                  duplicate: bool) -> bytes | str:
    if duplicate:
        return f"duplicate member name {member.name!r}: an earlier member of this tar has it; not read"
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return UNSAFE
    if member.size > max_member_bytes:
        return str(ObjectTooLarge(f"member is {member.size} bytes, over the cap of {max_member_bytes}"))
    data = archive.extractfile(member)
    assert data is not None  # a regular file: _members reads no other kind
    return data.read()
