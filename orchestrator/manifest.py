"""The contract between planner and workers: an Item, and a shard's manifest of them.

A shard's manifest is the whole truth about which items it owns, so a redelivered
shard reads the same items in the same order and writes the same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.constants import manifest_name
from orchestrator.storage import ObjectStore, join


@dataclass(frozen=True)
class Item:
    """One input object: `key` is what result rows show, `uri` is where to read it."""

    key: str
    uri: str
    size: int = -1
    etag: str = ""
    tar: bool = False  # a webdataset-style .tar whose image members the worker expands

    def to_line(self) -> str:
        line = {"key": self.key, "uri": self.uri, "size": self.size, "etag": self.etag}
        return json.dumps({**line, "tar": True} if self.tar else line)

    @classmethod
    def from_line(cls, line: str) -> Item:
        return cls(**json.loads(line))



def write_manifests(plan_, output: str, store: ObjectStore) -> list[str]:
    """One JSON-lines file per shard of the plan (`plan_.shards()`), in the job's folder."""
    uris = []
    for index, items in plan_.shards():
        uri = join(output, manifest_name(index))
        store.write(uri, ("\n".join(item.to_line() for item in items) + "\n").encode())
        uris.append(uri)
    return uris


def read_manifest(output: str, shard: int, store: ObjectStore) -> list[Item]:
    """The items a shard owns, in the order its rows will have."""
    data = store.read(join(output, manifest_name(shard))).decode()
    return [Item.from_line(line) for line in data.splitlines() if line]
