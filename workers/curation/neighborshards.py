"""The shards of a neighbors job: one block of query vectors against every indexed vector, exact.

Cosine top-k by blocked matrix products: the query block (unit rows) times each embed part of
--embeddings in turn, keeping a running top-k, so memory is queries x (k + part rows).
Rows: key, neighbors (keys, best first), cosines.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.jobs import NeighborsSpec
from orchestrator.storage import ObjectStore
from orchestrator.vectorplan import VectorPlan
from orchestrator.vectorsource import VectorSource, read_vectors
from workers.curation.semdedup import unit_rows

ProgressFn = Callable[[int, int], None]
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("neighbors", pa.list_(pa.string())),
                           ("cosines", pa.list_(pa.float32()))])


def query_rows(source: VectorSource, start: int, stop: int, store: ObjectStore) -> tuple[list[str], np.ndarray]:
    """(keys, unit rows) of the global rows [start, stop) of a source."""
    offsets, keys, rows = source.offsets(), [], []
    for part in range(len(source.parts)):
        lo, hi = max(start, offsets[part]), min(stop, offsets[part + 1])
        if lo < hi:
            part_keys, vectors = read_vectors(source, part, store)
            keys += part_keys[lo - offsets[part]:hi - offsets[part]]
            rows.append(unit_rows(vectors[lo - offsets[part]:hi - offsets[part]]))
    return keys, np.concatenate(rows)


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of every row, best first (ties: the lower id first)."""
    k = min(k, scores.shape[1])
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if scores.size else np.zeros((len(scores), 0), int)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def search(plan: VectorPlan, k: int, queries: np.ndarray, store: ObjectStore,
           on_progress: ProgressFn | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(indexed keys, top-k cosines, top-k global indexed rows) of unit query rows, exact."""
    best = np.zeros((len(queries), 0), np.float32)
    where = np.zeros((len(queries), 0), np.int64)
    keys: list[str] = []
    for part in range(len(plan.source.parts)):
        part_keys, vectors = read_vectors(plan.source, part, store)
        if not part_keys:
            continue
        scores = queries @ unit_rows(vectors).T
        ids = np.broadcast_to(np.arange(len(keys), len(keys) + len(part_keys)), scores.shape)
        best, where = merge_top_k(np.concatenate([best, scores], 1), np.concatenate([where, ids], 1), k)
        keys += part_keys
        if on_progress:
            on_progress(part + 1, len(plan.source.parts))
    return keys, best, where


def run_neighbors_shard(spec: NeighborsSpec, plan: VectorPlan, shard: int, store: ObjectStore, job_id: str,
                        token: int, on_progress: ProgressFn | None = None) -> tuple[dict, dict]:
    _, index = plan.phase(shard)
    start, stop = plan.query_blocks[index]
    query_keys, queries = query_rows(plan.queries, start, stop, store)
    keys, best, where = search(plan, spec.k, queries, store, on_progress)
    table = pa.table({"key": query_keys, "neighbors": [[keys[i] for i in row] for row in where],
                      "cosines": [row.tolist() for row in best]}, schema=RESULT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return {f"part-{shard:05d}.parquet": buffer.getvalue()}, {"rows": len(query_keys), "mode": "exact"}
