"""Shard outputs: the part file under a deterministic key, then its commit marker.

The marker is written last, so a marker's presence means the part is whole. A
redelivered shard rewrites the same keys with the same rows: exactly-once output
on top of at-least-once delivery.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import commit_name
from orchestrator.storage import ObjectStore, join


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def commit_shard(store: ObjectStore, output: str, shard: int, parts: dict[str, bytes], summary: dict) -> dict:
    """Write each part (name -> bytes), then the marker naming them with their sha256."""
    written = {}
    for name, data in parts.items():
        store.write(join(output, name), data)
        written[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker = {"shard": shard, "parts": written, "committed_at": time.time(), **summary}
    store.write(join(output, commit_name(shard)), json.dumps(marker, indent=2).encode())
    return marker


def read_commit(store: ObjectStore, output: str, shard: int) -> dict | None:
    uri = join(output, commit_name(shard))
    if not store.exists(uri):
        return None
    return json.loads(store.read(uri))
