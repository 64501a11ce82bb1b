"""Shard outputs: the part files under deterministic keys in the job's folder, then the commit marker.

The marker is written last, so a marker's presence means the parts are whole. A
redelivered shard rewrites the same keys with the same rows: exactly-once output
on top of at-least-once delivery. A marker names its job; one of another job is
never honoured (its folder is another job's anyway).
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import commit_name
from orchestrator.errors import ObjectNotFound
from orchestrator.storage import ObjectStore, join


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def part_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def upload_parts(store: ObjectStore, folder: str, parts: dict[str, bytes]) -> dict[str, dict]:
    """Write each part into the job's folder; name -> part_entry for the marker."""
    written = {}
    for name, data in parts.items():
        store.write(join(folder, name), data)
        written[name] = part_entry(data)
    return written


def commit_shard(store: ObjectStore, folder: str, shard: int, parts: dict[str, bytes], summary: dict,
                 written: dict[str, dict] | None = None) -> dict:
    """Write each part (name -> bytes) into the job's folder, then the marker naming them with their sha256.

    `summary` carries job_id and spec_sha256; `written`: parts already uploaded (name -> part_entry).
    """
    written = {**(written or {}), **upload_parts(store, folder, parts)}
    marker = {"shard": shard, "parts": written, "committed_at": time.time(), **summary}
    store.write(join(folder, commit_name(shard)), json.dumps(marker, indent=2).encode())
    return marker


def read_commit(store: ObjectStore, folder: str, shard: int, job_id: str) -> dict | None:
    """The shard's marker when this job wrote it; None when missing or another job's (stale)."""
    try:
        marker = json.loads(store.read(join(folder, commit_name(shard))))
    except ObjectNotFound:
        return None
    return marker if marker.get("job_id") == job_id else None


def written_files(store: ObjectStore, folder: str) -> dict[str, dict]:
    """What a single-task job (finetune, evaluate) wrote into its folder, for its marker:
    not its own records (`_*`) nor resumable checkpoints."""
    from orchestrator.modelinfo import model_files
    from orchestrator.storage import relative_key

    return {relative_key(folder, info.uri): part_entry(store.read(info.uri)) for info in model_files(folder, store)}
