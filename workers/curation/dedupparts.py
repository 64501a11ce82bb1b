"""The files a dedup job's phases hand each other, and how a phase reads what an earlier one committed.

    assign/g-GGGGG/part-PPPPP.{parquet,npy}  one embed part's rows whose cluster is in group G
    visit/g-GGGGG/part-PPPPP.{parquet,npy}   one embed part's rows that visit a cluster of group G
    pairs/part-SSSSS.parquet                 a group's rows as its clusters decided them (+ rank)
    pairs/edges-SSSSS.parquet                its pairs at or above the threshold, inside and across clusters
    part-SSSSS.parquet                       the published rows (written by the manifest shard)
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import CorruptOutput, StorageError
from orchestrator.lifecycle.commits import ShardMarker
from orchestrator.store.storage import ObjectStore, join
from workers.writers import read_commit

RESULT_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("duplicate_of", pa.string()),
                           ("cosine", pa.float32()), ("kept", pa.bool_())])
DECIDED_SCHEMA = RESULT_SCHEMA.append(pa.field("rank", pa.float64()))  # the job-wide keep order, ties by key
BUCKET_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("centroid_cosine", pa.float32()),
                           ("visits", pa.list_(pa.int32()))])  # the near other clusters, -1 past the last
VISIT_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("target", pa.int32())])
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("cosine", pa.float32()), ("across", pa.bool_())])


def bucket_name(group: int, part: int, ext: str) -> str:
    return f"assign/g-{group:05d}/part-{part:05d}.{ext}"


def visit_name(group: int, part: int, ext: str) -> str:
    return f"visit/g-{group:05d}/part-{part:05d}.{ext}"


def decided_name(shard: int) -> str:
    return f"pairs/part-{shard:05d}.parquet"


def edges_name(shard: int) -> str:
    return f"pairs/edges-{shard:05d}.parquet"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def table_bytes(columns: dict, schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def committed_part(store: ObjectStore, folder: str, marker: ShardMarker, name: str) -> bytes:
    """A part an earlier phase's marker names, checked against the sha256 it recorded."""
    data = store.read(join(folder, name))
    if hashlib.sha256(data).hexdigest() != marker.parts[name].sha256:
        raise CorruptOutput(f"{join(folder, name)} changed after shard {marker.shard} committed it: retry the job")
    return data


def committed_table(store: ObjectStore, folder: str, marker: ShardMarker, name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(committed_part(store, folder, marker, name)))


def committed_array(store: ObjectStore, folder: str, marker: ShardMarker, name: str) -> np.ndarray:
    return np.load(io.BytesIO(committed_part(store, folder, marker, name)), allow_pickle=False)


def phase_marker(store: ObjectStore, folder: str, shard: int, job_id: str) -> ShardMarker:
    marker = read_commit(store, folder, shard, job_id)
    if marker is None:
        raise StorageError(f"job {job_id}: shard {shard} is recorded committed but its marker is missing from {folder}")
    return marker
