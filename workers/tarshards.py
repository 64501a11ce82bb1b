"""Webdataset-style .tar inputs: one object read for a thousand images.

A tar shard's image members become items keyed `<tar key>/<member name>`, in member
order, so a redelivered shard yields the same rows. Only regular files with image
suffixes count; members with unsafe names (absolute, `..`) are reported as error rows,
never extracted anywhere: bytes stay in memory.
"""

from __future__ import annotations

import io
import tarfile

from orchestrator.errors import ObjectTooLarge
from orchestrator.planner import Item, is_image_key
from orchestrator.storage import ObjectStore

UNSAFE = "unsafe member name (absolute or '..'): not read"


def expand(tar_item: Item, store: ObjectStore, max_tar_bytes: int, max_member_bytes: int
           ) -> tuple[list[Item], dict[str, bytes | str]]:
    """(member items, uri -> bytes, or an error reason for members that are not read)."""
    data = store.read(tar_item.uri, max_bytes=max_tar_bytes)
    items: list[Item] = []
    blobs: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        for member in archive:
            if not member.isfile() or not is_image_key(member.name):
                continue
            item = Item(key=f"{tar_item.key}/{member.name}", uri=f"{tar_item.uri}#{member.name}",
                        size=member.size, etag=f"{tar_item.etag}:{member.offset_data}")
            items.append(item)
            if member.name.startswith("/") or ".." in member.name.split("/"):
                blobs[item.uri] = UNSAFE
            elif member.size > max_member_bytes:
                blobs[item.uri] = str(ObjectTooLarge(f"member is {member.size} bytes, over the cap of {max_member_bytes}"))
            else:
                blobs[item.uri] = archive.extractfile(member).read()
    return items, blobs
