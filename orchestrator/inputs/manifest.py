"""The contract between planner and workers: an Item, and a shard's manifest of them.

A shard's manifest is the whole truth about which items it owns, so a redelivered
shard reads the same items in the same order and writes the same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.constants import KEPT_COLUMNS_FILE, manifest_name
from orchestrator.store.storage import ObjectStore, join


@dataclass(frozen=True)
class Item:
    """One input object: `key` is what result rows show, `uri` is where to read it."""

    key: str
    uri: str
    size: int = -1
    etag: str = ""
    tar: bool = False  # a webdataset-style .tar whose image members the worker expands
    # A parquet row group (row_group >= 0) whose rows the worker expands: rows first_row ..
    # first_row + rows - 1 of the file (parquetinputs.py).
    row_group: int = -1
    first_row: int = 0
    rows: int = 0

    def to_line(self) -> str:
        line = {"key": self.key, "uri": self.uri, "size": self.size, "etag": self.etag}
        if self.row_group >= 0:
            line.update(row_group=self.row_group, first_row=self.first_row, rows=self.rows)
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
    if getattr(plan_, "kept_columns", None) is not None:
        store.write(join(output, KEPT_COLUMNS_FILE), plan_.kept_columns.serialize().to_pybytes())
    return uris


def read_kept_columns(output: str, store: ObjectStore):
    """The kept columns' pyarrow schema the planner wrote into the job's folder."""
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(store.read(join(output, KEPT_COLUMNS_FILE))))


def read_manifest(output: str, shard: int, store: ObjectStore) -> list[Item]:
    """The items a shard owns, in the order its rows will have."""
    data = store.read(join(output, manifest_name(shard))).decode()
    return [Item.from_line(line) for line in data.splitlines() if line]
