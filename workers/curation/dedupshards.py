"""The shards of a dedup job, one function per phase (plain functions: tasks and tests call them).

    fit       a seeded sample of the vectors -> spherical k-means -> kmeans/centroids-<lease>.npy
    assign    one embed part -> nearest centroid per row -> assign/g-GGGGG/part-PPPPP.{parquet,npy}
              (the part's rows bucketed by cluster group, vectors as the embed job stored them)
    pairs     one cluster group's buckets -> SemDeDup per cluster -> part-SSSSS.parquet
              (key, cluster, duplicate_of, cosine, kept)
    manifest  every pairs part -> kept.jsonl (the kept keys, in the embed job's input) and the
              per-cluster counts the job's record carries

Each returns the parts it wrote (name -> bytes) and the marker fields; the caller commits them
with the same marker protocol as an image shard. A later phase reads only what the earlier
phases' commit markers name, each part checked against its sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.commits import ShardMarker
from orchestrator.constants import KEPT_MANIFEST
from orchestrator.errors import CorruptOutput, StorageError
from orchestrator.jobs import DedupSpec
from orchestrator.storage import ObjectStore, join
from orchestrator.vectorplan import VectorPlan
from orchestrator.vectorsource import read_vectors
from workers.curation import semdedup
from workers.writers import read_commit

ProgressFn = Callable[[int, int], None]
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("duplicate_of", pa.string()),
                           ("cosine", pa.float32()), ("kept", pa.bool_())])
BUCKET_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("centroid_cosine", pa.float32())])


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


def phase_marker(store: ObjectStore, folder: str, shard: int, job_id: str) -> ShardMarker:
    marker = read_commit(store, folder, shard, job_id)
    if marker is None:
        raise StorageError(f"job {job_id}: shard {shard} is recorded committed but its marker is missing from {folder}")
    return marker


def fit(spec: DedupSpec, plan: VectorPlan, store: ObjectStore, token: int) -> tuple[dict, dict]:
    """k-means on a seeded sample. The file name carries the delivery's lease token: k-means on
    several threads is not bit-reproducible, and a late delivery must not overwrite what the
    committed one's marker names."""
    offsets = plan.source.offsets()
    chosen = np.sort(np.random.default_rng(spec.seed).choice(plan.source.rows, plan.sample_rows, replace=False))
    sample = []
    for part in range(len(plan.source.parts)):
        pick = chosen[(chosen >= offsets[part]) & (chosen < offsets[part + 1])] - offsets[part]
        if len(pick):
            sample.append(semdedup.unit_rows(read_vectors(plan.source, part, store)[1][pick]))
    centroids = semdedup.fit_centroids(np.concatenate(sample), plan.clusters, spec.seed)
    return {f"kmeans/centroids-{token:08d}.npy": npy_bytes(centroids)}, {"rows": 0, "sample_rows": len(chosen)}


def centroids_of(store: ObjectStore, folder: str, plan: VectorPlan, job_id: str) -> np.ndarray:
    marker = phase_marker(store, folder, plan.phase_range("fit")[0], job_id)
    (name,) = [n for n in marker.parts if n.startswith("kmeans/")]
    return np.load(io.BytesIO(committed_part(store, folder, marker, name)), allow_pickle=False)


def bucket_name(group: int, part: int, ext: str) -> str:
    return f"assign/g-{group:05d}/part-{part:05d}.{ext}"


def assign(plan: VectorPlan, part: int, store: ObjectStore, folder: str, job_id: str) -> tuple[dict, dict]:
    """Nearest centroid of every row of one embed part; the rows bucketed by cluster group."""
    keys, vectors = read_vectors(plan.source, part, store)
    if not keys:
        return {}, {"rows": 0}
    labels, cosine = semdedup.assign(semdedup.unit_rows(vectors), centroids_of(store, folder, plan, job_id))
    groups = labels % plan.groups
    parts = {}
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        parts[bucket_name(group, part, "parquet")] = table_bytes(
            {"key": [keys[i] for i in rows], "cluster": labels[rows], "centroid_cosine": cosine[rows]}, BUCKET_SCHEMA)
        parts[bucket_name(group, part, "npy")] = npy_bytes(vectors[rows])
    return parts, {"rows": 0}


def read_group(plan: VectorPlan, group: int, store: ObjectStore, folder: str, job_id: str):
    """(keys, clusters, centroid cosines, float16 vectors) of one cluster group, from every assign marker."""
    keys, clusters, cosines, vectors = [], [], [], []
    for index, shard in enumerate(plan.phase_range("assign")):
        marker = phase_marker(store, folder, shard, job_id)
        name = bucket_name(group, index, "parquet")
        if name not in marker.parts:
            continue
        table = pq.read_table(io.BytesIO(committed_part(store, folder, marker, name)))
        keys += table.column("key").to_pylist()
        clusters.append(table.column("cluster").to_numpy())
        cosines.append(table.column("centroid_cosine").to_numpy())
        npy = committed_part(store, folder, marker, bucket_name(group, index, "npy"))
        vectors.append(np.load(io.BytesIO(npy), allow_pickle=False))
    if not keys:
        return [], np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, 1), np.float16)
    return keys, np.concatenate(clusters), np.concatenate(cosines), np.concatenate(vectors)


def pairs(spec: DedupSpec, plan: VectorPlan, group: int, store: ObjectStore, folder: str, job_id: str,
          on_progress: ProgressFn | None = None) -> tuple[bytes, dict]:
    """SemDeDup inside every cluster of one group: the result rows and the per-cluster counts."""
    keys, clusters, cosines, vectors = read_group(plan, group, store, folder, job_id)
    unit = semdedup.unit_rows(vectors)
    out: dict[str, list] = {name: [] for name in RESULT_SCHEMA.names}
    counts: dict[str, list[int]] = {}
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)
        found = semdedup.dedup_cluster(unit[rows], [keys[i] for i in rows], cosines[rows], eps=spec.eps,
                                       keep=spec.keep, seed=spec.seed + int(cluster), max_rows=spec.max_cluster_size)
        ordered = rows[found.order]
        out["key"] += [keys[i] for i in ordered]
        out["cluster"] += [int(cluster)] * len(rows)
        out["duplicate_of"] += [None if kept else keys[rows[m]] for kept, m in zip(found.kept, found.match)]
        out["cosine"] += [None if np.isnan(c) else float(c) for c in found.cosine]
        out["kept"] += found.kept.tolist()
        kept = int(found.kept.sum())
        counts[str(int(cluster))] = [kept, len(rows) - kept]
        if on_progress:
            on_progress(len(out["key"]), len(keys))
    return table_bytes(out, RESULT_SCHEMA), {"rows": len(keys), "clusters": counts}


def manifest(plan: VectorPlan, store: ObjectStore, folder: str, job_id: str) -> tuple[dict, dict]:
    """kept.jsonl (one {"key": ...} per kept row, keys as in the embed job's input) and the job's counts."""
    lines, clusters = [], {}
    for shard in plan.phase_range("pairs"):
        marker = phase_marker(store, folder, shard, job_id)
        for name in sorted(n for n in marker.parts if n.endswith(".parquet")):
            table = pq.read_table(io.BytesIO(committed_part(store, folder, marker, name)), columns=["key", "kept"])
            lines += [json.dumps({"key": key}) for key, kept in zip(table.column("key").to_pylist(),
                                                                   table.column("kept").to_pylist()) if kept]
        clusters.update({c: {"kept": k, "removed": r} for c, (k, r) in marker.extra["clusters"].items()})
    kept = sum(c["kept"] for c in clusters.values())
    summary = {"kept": kept, "removed": sum(c["removed"] for c in clusters.values()), "input": plan.source.input,
               "kept_manifest": KEPT_MANIFEST, "clusters": dict(sorted(clusters.items(), key=lambda kv: int(kv[0])))}
    return {KEPT_MANIFEST: ("\n".join(lines) + "\n").encode()}, {"rows": 0, "job_fields": {"dedup": summary}}


def run_dedup_shard(spec: DedupSpec, plan: VectorPlan, shard: int, store: ObjectStore, job_id: str, token: int,
                    on_progress: ProgressFn | None = None) -> tuple[dict, dict]:
    """The shard's parts (name -> bytes) and marker fields, by its phase. `spec.output` is the job's folder."""
    phase, index = plan.phase(shard)
    folder = spec.output
    if phase == "fit":
        return fit(spec, plan, store, token)
    if phase == "assign":
        return assign(plan, index, store, folder, job_id)
    if phase == "pairs":
        data, fields = pairs(spec, plan, index, store, folder, job_id, on_progress)
        return {f"part-{shard:05d}.parquet": data}, fields
    return manifest(plan, store, folder, job_id)
