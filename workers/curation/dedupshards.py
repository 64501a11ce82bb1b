"""The shards of a dedup job, one function per phase (plain functions: tasks and tests call them).

    fit       a seeded sample of the vectors -> spherical k-means -> kmeans/centroids-<lease>.npy
    assign    one embed part -> nearest centroid per row -> its rows bucketed by cluster group, and
              (rule kept) the rows that visit a near other cluster bucketed by that cluster's group
    pairs     one cluster group -> the rule inside every cluster, and (rule kept) the pairs between
              each cluster's rows and its visitors -> the decided rows and the pairs above the threshold
    manifest  every pairs shard -> the kept rule over the pairs across clusters -> the published rows
              (key, cluster, duplicate_of, cosine, kept), kept.jsonl and the counts the record carries

Each returns the parts it wrote (name -> bytes) and the marker fields; the caller commits them
with the same marker protocol as an image shard. A later phase reads only what the earlier
phases' commit markers name, each part checked against its sha256 (dedupparts.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.inputs.vectorsource import read_vectors
from orchestrator.jobspec.vectorspecs import DedupSpec
from orchestrator.lifecycle.commits import ShardWork, VectorShard
from orchestrator.store.storage import ObjectStore
from workers.curation import crosscluster, semdedup
from workers.curation.dedupparts import (
    BUCKET_SCHEMA,
    DECIDED_SCHEMA,
    EDGE_SCHEMA,
    VISIT_SCHEMA,
    bucket_name,
    committed_array,
    committed_table,
    decided_name,
    edges_name,
    npy_bytes,
    phase_marker,
    table_bytes,
    visit_name,
)

ProgressFn = Callable[[int, int], None]


def probes(spec: DedupSpec) -> int:
    """How many other clusters each row visits: none under NeMo's rule, which never compares them."""
    return spec.cross_clusters if spec.rule == "kept" else 0


def fit(spec: DedupSpec, plan: VectorPlan, store: ObjectStore, token: int) -> tuple[dict, ShardWork]:
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
    return ({f"kmeans/centroids-{token:08d}.npy": npy_bytes(centroids)},
            ShardWork(rows=0, outcome=VectorShard("fit", sample_rows=len(chosen))))


def centroids_of(store: ObjectStore, folder: str, plan: VectorPlan, job_id: str) -> np.ndarray:
    marker = phase_marker(store, folder, plan.phase_range("fit")[0], job_id)
    (name,) = [n for n in marker.parts if n.startswith("kmeans/")]
    return committed_array(store, folder, marker, name)


def assign(spec: DedupSpec, plan: VectorPlan, part: int, store: ObjectStore, folder: str,
           job_id: str) -> tuple[dict, ShardWork]:
    """Nearest centroid of every row of one embed part; the rows bucketed by cluster group, and
    each visit of a near other cluster by that cluster's group."""
    keys, vectors = read_vectors(plan.source, part, store)
    if not keys:
        return {}, ShardWork(rows=0, outcome=VectorShard("assign"))
    centroids = centroids_of(store, folder, plan, job_id)
    found = crosscluster.plan_visits(semdedup.unit_rows(vectors), centroids, probes(spec), spec.eps)
    labels, cosine, visited = found.home, found.cosine, found.others
    groups = labels % plan.groups
    parts = {}
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        parts[bucket_name(group, part, "parquet")] = table_bytes(
            {"key": [keys[i] for i in rows], "cluster": labels[rows], "centroid_cosine": cosine[rows],
             "visits": visited[rows].tolist()}, BUCKET_SCHEMA)
        parts[bucket_name(group, part, "npy")] = npy_bytes(vectors[rows])
    rows, slot = np.nonzero(found.visit)
    targets = visited[rows, slot]
    for group in np.unique(targets % plan.groups):
        mine = np.flatnonzero(targets % plan.groups == group)
        parts[visit_name(group, part, "parquet")] = table_bytes(
            {"key": [keys[i] for i in rows[mine]], "cluster": labels[rows[mine]], "target": targets[mine]},
            VISIT_SCHEMA)
        parts[visit_name(group, part, "npy")] = npy_bytes(vectors[rows[mine]])
    return parts, ShardWork(rows=0, outcome=VectorShard("assign", visits=len(rows)))


def read_buckets(plan: VectorPlan, group: int, store: ObjectStore, folder: str, job_id: str,
                 name_of: Callable[[int, int, str], str]) -> tuple[dict[str, list], np.ndarray]:
    """The columns and float16 vectors of one group's buckets (assign or visit), from every assign marker."""
    columns: dict[str, list] = {}
    vectors = []
    for index, shard in enumerate(plan.phase_range("assign")):
        marker = phase_marker(store, folder, shard, job_id)
        if name_of(group, index, "parquet") not in marker.parts:
            continue
        for name, values in committed_table(store, folder, marker, name_of(group, index, "parquet")).to_pydict().items():
            columns.setdefault(name, []).extend(values)
        vectors.append(committed_array(store, folder, marker, name_of(group, index, "npy")))
    return columns, (np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float16))


def pairs(spec: DedupSpec, plan: VectorPlan, group: int, store: ObjectStore, folder: str, job_id: str,
          on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    """The rule inside every cluster of one group, then the pairs between each cluster and its visitors."""
    bucket, vectors = read_buckets(plan, group, store, folder, job_id, bucket_name)
    keys, clusters = bucket.get("key", []), np.asarray(bucket.get("cluster", []), dtype=np.int32)
    cosines = np.asarray(bucket.get("centroid_cosine", []), dtype=np.float32)
    unit = semdedup.unit_rows(vectors)
    out: dict[str, list] = {name: [] for name in DECIDED_SCHEMA.names}
    edges: dict[str, list] = {name: [] for name in EDGE_SCHEMA.names}
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)
        found = crosscluster.dedup_cluster(unit[rows], [keys[i] for i in rows], cosines[rows], eps=spec.eps,
                                           keep=spec.keep, seed=spec.seed + int(cluster), max_rows=spec.max_cluster_size,
                                           rule=spec.rule, probes=probes(spec))
        add_decided(out, found, rows, keys, int(cluster))
        names = [keys[i] for i in rows]
        add_edges(edges, names, found.pairs[~found.across], found.pair_cosine[~found.across], False)
        add_edges(edges, names, found.pairs[found.across], found.pair_cosine[found.across], True)  # across pieces
        if on_progress:
            on_progress(len(out["key"]), len(keys))
    visits = np.asarray(bucket.get("visits", []), dtype=np.int32).reshape(len(keys), crosscluster.back_clusters(probes(spec)))
    across = cross_edges(spec, plan, group, store, folder, job_id, (keys, clusters, unit, visits), edges)
    shard = plan.phase_range("pairs")[group]
    parts = {decided_name(shard): table_bytes(out, DECIDED_SCHEMA), edges_name(shard): table_bytes(edges, EDGE_SCHEMA)}
    removed = len(out["key"]) - sum(out["kept"])
    return parts, ShardWork(rows=len(keys), outcome=VectorShard("pairs", removed_in_clusters=removed, cross_pairs=across))


def add_decided(out: dict[str, list], found: semdedup.ClusterResult, rows: np.ndarray, keys: list[str],
                cluster: int) -> None:
    """One cluster's rows in keep order, as its rule decided them."""
    out["key"] += [keys[rows[i]] for i in found.order]
    out["cluster"] += [cluster] * len(rows)
    out["duplicate_of"] += [None if kept else keys[rows[m]] for kept, m in zip(found.kept, found.match)]
    out["cosine"] += [None if np.isnan(c) else float(c) for c in found.cosine]
    out["kept"] += found.kept.tolist()
    out["rank"] += found.rank.tolist()


def add_edges(edges: dict[str, list], keys: list[str], pairs: np.ndarray, cosine: np.ndarray, across: bool) -> None:
    edges["a"] += [keys[i] for i in pairs[:, 0]]
    edges["b"] += [keys[i] for i in pairs[:, 1]]
    edges["cosine"] += cosine.tolist()
    edges["across"] += [across] * len(pairs)


def cross_edges(spec: DedupSpec, plan: VectorPlan, group: int, store: ObjectStore, folder: str, job_id: str,
                residents: tuple[list[str], np.ndarray, np.ndarray, np.ndarray], edges: dict[str, list]) -> int:
    """Add the pairs between every cluster of the group and the rows visiting it; returns how many
    (a pair may be found from both its clusters: the resolution counts it once)."""
    if not probes(spec):
        return 0
    keys, clusters, unit, visits = residents
    visit, vectors = read_buckets(plan, group, store, folder, job_id, visit_name)
    home, target = np.asarray(visit.get("cluster", []), np.int32), np.asarray(visit.get("target", []), np.int32)
    visitors = semdedup.unit_rows(vectors)
    before = len(edges["a"])
    resident_rows, visiting = by_cluster(clusters), by_cluster(target)
    for cluster, theirs in visiting.items():
        mine = resident_rows.get(cluster, np.zeros(0, np.int64))
        found = crosscluster.cross_pairs(unit[mine], visits[mine], visitors[theirs], home[theirs], spec.eps)
        a, b = theirs[found.pairs[:, 0]], mine[found.pairs[:, 1]]
        names = [visit["key"][i] for i in a] + [keys[i] for i in b]  # only the rows of a pair: most rows have none
        add_edges(edges, names, np.stack([np.arange(len(a)), len(a) + np.arange(len(b))], axis=1), found.cosine, True)
    return len(edges["a"]) - before


def by_cluster(clusters: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices per cluster id, sorted once (not one scan of every row per cluster)."""
    order = np.argsort(clusters, kind="stable")
    ids, starts = np.unique(clusters[order], return_index=True)
    return {int(c): rows for c, rows in zip(ids, np.split(order, starts[1:]))}


def run_dedup_shard(spec: DedupSpec, plan: VectorPlan, shard: int, store: ObjectStore, job_id: str, token: int,
                    on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    """The shard's parts (name -> bytes) and what its work found, by its phase. `spec.output` is the job's folder."""
    from workers.curation.dedupmanifest import manifest

    phase, index = plan.phase(shard)
    folder = spec.output
    if phase == "fit":
        return fit(spec, plan, store, token)
    if phase == "assign":
        return assign(spec, plan, index, store, folder, job_id)
    if phase == "pairs":
        return pairs(spec, plan, index, store, folder, job_id, on_progress)
    return manifest(spec, plan, store, folder, job_id)
