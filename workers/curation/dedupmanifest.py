"""The last shard of a dedup job: the kept rule across clusters, the published rows, kept.jsonl.

The pairs shards decided every cluster alone and listed the pairs at or above the threshold,
inside clusters and across them. Here the pairs across clusters are resolved with the same
rule over the whole set (workers/curation/crosscluster.py): a row the clusters kept may go (a
row kept before it in another cluster stands for it), and a row whose stand-in went may come
back. Then every row is published: `duplicate_of` always names a kept row.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from orchestrator.constants import KEPT_MANIFEST
from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.jobspec.vectorspecs import DedupSpec
from orchestrator.lifecycle.commits import ShardWork, VectorShard
from orchestrator.store.storage import ObjectStore
from workers.curation import crosscluster
from workers.curation.dedupparts import (
    RESULT_SCHEMA,
    committed_table,
    decided_name,
    edges_name,
    phase_marker,
    table_bytes,
)


def read_decided(plan: VectorPlan, store: ObjectStore, folder: str, job_id: str) -> tuple[list[pa.Table], pa.Table]:
    """Every pairs shard's decided rows (one table per shard) and all their pairs in one table."""
    decided, edges = [], []
    for shard in plan.phase_range("pairs"):
        marker = phase_marker(store, folder, shard, job_id)
        decided.append(committed_table(store, folder, marker, decided_name(shard)))
        edges.append(committed_table(store, folder, marker, edges_name(shard)))
    return decided, pa.concat_tables(edges)


def resolve_across(rows: dict[str, list], edges: pa.Table) -> dict:
    """Apply the kept rule over the pairs across clusters to `rows` (columns of every row, in place);
    returns what it changed."""
    across = np.asarray(edges.column("across").to_pylist(), dtype=bool)
    if not across.any():
        return {"pairs": 0, "removed": 0, "kept_again": 0}
    index = {key: i for i, key in enumerate(rows["key"])}
    pairs = np.array([[index[a], index[b]] for a, b in zip(edges.column("a").to_pylist(),
                                                          edges.column("b").to_pylist())], dtype=np.int64)
    rank, cosine = np.asarray(rows["rank"], dtype=np.float64), np.asarray(edges.column("cosine"), dtype=np.float32)
    found = crosscluster.resolve(rank, rows["key"], pairs, cosine, across)
    removed = kept_again = 0
    for row, kept, stand_in, best in zip(found.rows, found.kept, found.stand_in, found.cosine):
        removed += int(rows["kept"][row] and not kept)
        kept_again += int(kept and not rows["kept"][row])
        rows["kept"][row] = bool(kept)
        rows["duplicate_of"][row] = None if kept else rows["key"][stand_in]
        rows["cosine"][row] = None if kept else float(best)
    return {"pairs": int(np.unique(np.sort(pairs[across], axis=1), axis=0).shape[0]), "removed": removed,
            "kept_again": kept_again}


def manifest(spec: DedupSpec, plan: VectorPlan, store: ObjectStore, folder: str, job_id: str) -> tuple[dict, ShardWork]:
    """The published rows (one part per pairs shard), kept.jsonl (one {"key": ...} per kept row, keys
    as in the embed job's input) and the job's counts."""
    decided, edges = read_decided(plan, store, folder, job_id)
    rows = pa.concat_tables(decided).to_pydict()
    removed_in_clusters = len(rows["kept"]) - sum(rows["kept"])
    across = resolve_across(rows, edges)
    if spec.rule == "kept":  # a kept row stands for itself: its cosine says nothing about a removal
        rows["cosine"] = [None if kept else cosine for kept, cosine in zip(rows["kept"], rows["cosine"])]
    parts, start = {}, 0
    for shard, table in zip(plan.phase_range("pairs"), decided):
        stop = start + table.num_rows
        parts[f"part-{shard:05d}.parquet"] = table_bytes({name: rows[name][start:stop] for name in RESULT_SCHEMA.names},
                                                          RESULT_SCHEMA)
        start = stop
    lines = [json.dumps({"key": key}) for key, kept in zip(rows["key"], rows["kept"]) if kept]
    parts[KEPT_MANIFEST] = ("\n".join(lines) + "\n").encode()
    figures = {**counts(rows), "input": plan.source.input, "kept_manifest": KEPT_MANIFEST, "rule": spec.rule,
               "phases": {"in_clusters": {"removed": removed_in_clusters},
                          "across_clusters": {"cross_clusters": spec.cross_clusters if spec.rule == "kept" else 0,
                                              **across}}}
    return parts, ShardWork(rows=0, outcome=VectorShard("manifest", job_fields={"dedup": figures}))


def counts(rows: dict[str, list]) -> dict:
    """Kept and removed in total and per cluster (clusters in numeric order)."""
    clusters: dict[int, dict[str, int]] = {}
    for cluster, kept in zip(rows["cluster"], rows["kept"]):
        count = clusters.setdefault(cluster, {"kept": 0, "removed": 0})
        count["kept" if kept else "removed"] += 1
    kept = sum(rows["kept"])
    return {"kept": kept, "removed": len(rows["kept"]) - kept,
            "clusters": {str(c): clusters[c] for c in sorted(clusters)}}
