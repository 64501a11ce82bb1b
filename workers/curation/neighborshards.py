"""The shards of a neighbors job, one function per phase (plain functions: tasks and tests call them).

    exact        search (1 per block of queries): the block against every embed part of
                 --embeddings, read in turn and searched in blocks of about 65,536 rows (faiss
                 flat inner product), keeping a running top-k: memory is queries x k plus one block
    approximate  index (1 shard): every indexed vector -> an IVF-Flat index (k-means on a
                 seeded sample), nprobe tuned to --recall-target, recall@k measured ->
                 index/ivf-<lease>.faiss and index/keys-<lease>.arrow (the indexed keys, in row order)
                 search (1 per block of queries): the block against that index

Rows of either (part-SSSSS.parquet): key, neighbors (keys, best first), cosines.

The index is built once per job, by its own shard, and stored in the job's folder like dedup's
centroids, rather than built again in every block: a build reads every indexed vector and runs
k-means, most of an approximate job's time (bench/RESULTS.md), which every block would repeat;
and faiss's k-means on several threads is not bit-reproducible, so blocks built apart would
search different indexes. The file names carry the delivery's lease token: a late delivery of
the index shard writes its own files, never the ones the committed marker names, and every search
shard reads the index and keys that marker names, each checked against its sha256.

Under --mode auto the index shard declines an index that would scan more than a sixteenth of its
lists to reach the recall target (vectors without clusters): it writes no index, and the blocks
search exactly (`neighbors: {mode: exact, index_declined: {...}}`). --mode approximate keeps it.

Recall: the index shard measures recall@k (workers/curation/knn.py) of the index at the tuned
nprobe against exact on a seeded sample of queries (256, or every query when there are fewer;
another seeded sample than the one nprobe was tuned on), and its marker carries it into the
job's record: `neighbors: {mode, k, recall_at_k, recall_sample, ...}`. An exact job's record
says `neighbors: {mode: exact, k}`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import CorruptOutput
from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.inputs.vectorsource import VectorSource, read_vectors
from orchestrator.jobspec.vectorspecs import NeighborsSpec
from orchestrator.lifecycle.commits import ShardMarker, ShardWork, VectorShard
from orchestrator.store.storage import ObjectStore
from workers.curation import knn
from workers.curation.dedupparts import committed_part, phase_marker
from workers.curation.semdedup import unit_rows

ProgressFn = Callable[[int, int], None]
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("neighbors", pa.list_(pa.string())),
                           ("cosines", pa.list_(pa.float32()))])
KEYS_SCHEMA = pa.schema([("key", pa.string())])
EXACT_BLOCK_ROWS = 65_536  # indexed rows per exact search call: embed parts are gathered up to this
ADD_BLOCK_ROWS = 65_536  # rows normalized to float32 and added to the index at a time
RECALL_SAMPLE = 256  # queries the index shard tunes nprobe on, and as many again it measures recall on
# --mode auto declines an index whose tuned nprobe scans more than this share of its lists: a list is
# scanned at about an eighth of the speed per vector of exact's matrix products, so such an index
# searches at best about twice as fast as exact and seldom repays its build (vectors without
# clusters needed 81% of the lists: bench/RESULTS.md, "Tenth session").
DECLINE_SCANNED_SHARE = 1 / 16


def tune_rows(queries: int, seed: int) -> np.ndarray:
    """The global query rows nprobe is tuned on."""
    return knn.sample_rows(queries, RECALL_SAMPLE, seed + 1)


def recall_rows(queries: int, seed: int) -> np.ndarray:
    """The global query rows the recorded recall@k is measured on."""
    return knn.sample_rows(queries, RECALL_SAMPLE, seed + 2)


def queries_of(plan: VectorPlan) -> VectorSource:
    if plan.queries is None:
        raise ValueError("a neighbors plan has query vectors: this one has none")
    return plan.queries


def query_parts(source: VectorSource, start: int, stop: int,
                store: ObjectStore) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, unit rows) of the global rows [start, stop) of a source, one embed part at a time."""
    offsets = source.offsets()
    for part in range(len(source.parts)):
        lo, hi = max(start, offsets[part]), min(stop, offsets[part + 1])
        if lo < hi:
            part_keys, vectors = read_vectors(source, part, store)
            yield part_keys[lo - offsets[part]:hi - offsets[part]], unit_rows(vectors[lo - offsets[part]:hi - offsets[part]])


def query_rows(source: VectorSource, start: int, stop: int, store: ObjectStore) -> tuple[list[str], np.ndarray]:
    """(keys, unit rows) of the global rows [start, stop) of a source."""
    keys: list[str] = []
    rows = []
    for part_keys, unit in query_parts(source, start, stop, store):
        keys += part_keys
        rows.append(unit)
    return keys, np.concatenate(rows)


def rows_at(source: VectorSource, rows: np.ndarray, store: ObjectStore) -> np.ndarray:
    """Unit rows of the given sorted global rows of a source (each embed part read once)."""
    offsets, out = source.offsets(), []
    for part in range(len(source.parts)):
        pick = rows[(rows >= offsets[part]) & (rows < offsets[part + 1])] - offsets[part]
        if len(pick):
            out.append(unit_rows(read_vectors(source, part, store)[1][pick]))
    return np.concatenate(out)


def search(plan: VectorPlan, k: int, queries: np.ndarray, store: ObjectStore,
           on_progress: ProgressFn | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(indexed keys, top-k cosines, top-k global indexed rows) of unit query rows, exact."""
    top = knn.RunningTopK(queries, k)
    keys: list[str] = []
    pending: list[np.ndarray] = []
    parts = len(plan.source.parts)
    for part in range(parts):
        part_keys, vectors = read_vectors(plan.source, part, store)
        if part_keys:
            keys += part_keys
            pending.append(vectors)
        if pending and (part + 1 == parts or sum(map(len, pending)) >= EXACT_BLOCK_ROWS):
            top.add(unit_rows(np.concatenate(pending)))
            pending = []
        if on_progress:
            on_progress(part + 1, parts)
    return keys, top.cosines, top.ids


def result_part(query_keys: list[str], keys: list[str], cosines: np.ndarray, ids: np.ndarray) -> bytes:
    table = pa.table({"key": query_keys, "neighbors": [[keys[i] for i in row] for row in ids],
                      "cosines": [row.tolist() for row in cosines]}, schema=RESULT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def search_exact(spec: NeighborsSpec, plan: VectorPlan, shard: int, store: ObjectStore,
                 on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    start, stop = plan.query_blocks[plan.phase(shard)[1]]
    query_keys, queries = query_rows(queries_of(plan), start, stop, store)
    keys, cosines, ids = search(plan, spec.k, queries, store, on_progress)
    # an approximate job's index shard says what the job did (its marker's job fields)
    job_fields = None if plan.approximate else {"neighbors": {"mode": "exact", "k": spec.k}}
    return ({f"part-{shard:05d}.parquet": result_part(query_keys, keys, cosines, ids)},
            ShardWork(rows=len(query_keys), outcome=VectorShard("search", mode="exact", job_fields=job_fields)))


def keys_bytes(keys: list[str]) -> bytes:
    buffer = io.BytesIO()
    with pa.ipc.new_file(buffer, KEYS_SCHEMA) as writer:
        writer.write_table(pa.table({"key": keys}, schema=KEYS_SCHEMA))
    return buffer.getvalue()


def keys_from(data: bytes) -> list[str]:
    return pa.ipc.open_file(pa.BufferReader(data)).read_all().column("key").to_pylist()


def build_index(spec: NeighborsSpec, plan: VectorPlan, store: ObjectStore, token: int,
                on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    """The index shard: the IVF-Flat index of every indexed vector, its keys, nprobe and recall."""
    keys: list[str] = []
    stored = []
    parts = len(plan.source.parts)
    for part in range(parts):
        part_keys, vectors = read_vectors(plan.source, part, store)
        if part_keys:
            keys += part_keys
            stored.append(vectors)  # as the embed job stored them (float16): unit float32 only per block
        if on_progress:
            on_progress(part + 1, parts)
    rows = np.concatenate(stored)
    lists = knn.lists_for(len(rows))
    index = knn.train_index(unit_rows(rows[knn.sample_rows(len(rows), knn.SAMPLE_PER_LIST * lists, spec.seed)]),
                            lists, spec.seed)
    for start in range(0, len(rows), ADD_BLOCK_ROWS):
        index.add(unit_rows(rows[start:start + ADD_BLOCK_ROWS]))
    total = queries_of(plan).rows
    tune, measure = tune_rows(total, spec.seed), recall_rows(total, spec.seed)
    sampled = np.unique(np.concatenate([tune, measure]))
    queries = rows_at(queries_of(plan), sampled, store)
    exact, _ = knn.exact_top_k(queries, rows, spec.k, EXACT_BLOCK_ROWS)
    at = {row: i for i, row in enumerate(sampled.tolist())}
    tuned, measured = [at[r] for r in tune.tolist()], [at[r] for r in measure.tolist()]
    nprobe, tune_recall = knn.tune_nprobe(index, queries[tuned], exact[tuned], spec.k, spec.recall_target)
    if spec.mode == "auto" and nprobe > DECLINE_SCANNED_SHARE * lists:  # the blocks search exactly instead
        declined = {"index": f"IVF{lists},Flat", "nprobe": nprobe, "tuned_recall_at_k": round(tune_recall, 4),
                    "recall_target": spec.recall_target}
        figures = {"mode": "exact", "k": spec.k, "index_declined": declined}
        return {}, ShardWork(rows=0, outcome=VectorShard("index", lists=lists, nprobe=nprobe, declined=True,
                                                         job_fields={"neighbors": figures}))
    found, _ = knn.search_index(index, queries[measured], spec.k, nprobe)
    recall = knn.recall_at_k(found, exact[measured], spec.k)
    figures = {"mode": "approximate", "k": spec.k, "index": f"IVF{lists},Flat", "nprobe": nprobe,
               "recall_at_k": round(recall, 4), "recall_sample": len(measure), "recall_target": spec.recall_target,
               "tuned_recall_at_k": round(tune_recall, 4), "indexed": len(rows)}
    parts_out = {f"index/ivf-{token:08d}.faiss": knn.index_bytes(index), f"index/keys-{token:08d}.arrow": keys_bytes(keys)}
    return parts_out, ShardWork(rows=0, outcome=VectorShard("index", lists=lists, nprobe=nprobe,
                                                            job_fields={"neighbors": figures}))


def committed_index(marker: ShardMarker, store: ObjectStore, folder: str):
    """(the index, its keys, nprobe) that the committed index shard's marker names."""
    (index_name,) = [n for n in marker.parts if n.endswith(".faiss")]
    (keys_name,) = [n for n in marker.parts if n.endswith(".arrow")]
    index = knn.index_from_bytes(committed_part(store, folder, marker, index_name))
    nprobe = marker.outcome_as(VectorShard).nprobe
    if nprobe is None:
        raise CorruptOutput(f"job {marker.job_id}: its index shard's marker names no nprobe: rerun the job")
    return index, keys_from(committed_part(store, folder, marker, keys_name)), nprobe


def search_approximate(spec: NeighborsSpec, plan: VectorPlan, shard: int, store: ObjectStore, marker: ShardMarker,
                       on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    """One block of queries against the job's index, one embed part of queries at a time."""
    index, keys, nprobe = committed_index(marker, store, spec.output)
    start, stop = plan.query_blocks[plan.phase(shard)[1]]
    query_keys: list[str] = []
    cosines, ids = [], []
    for part_keys, queries in query_parts(queries_of(plan), start, stop, store):
        found_cosines, found_ids = knn.search_index(index, queries, spec.k, nprobe)
        query_keys += part_keys
        cosines.append(found_cosines)
        ids.append(found_ids)
        if on_progress:
            on_progress(len(query_keys), stop - start)
    data = result_part(query_keys, keys, np.concatenate(cosines), np.concatenate(ids))
    return {f"part-{shard:05d}.parquet": data}, ShardWork(rows=len(query_keys),
                                                          outcome=VectorShard("search", mode="approximate"))


def run_neighbors_shard(spec: NeighborsSpec, plan: VectorPlan, shard: int, store: ObjectStore, job_id: str,
                        token: int, on_progress: ProgressFn | None = None) -> tuple[dict, ShardWork]:
    """The shard's parts (name -> bytes) and what its work found, by its phase. `spec.output` is the job's folder."""
    phase, _ = plan.phase(shard)
    if phase == "index":
        return build_index(spec, plan, store, token, on_progress)
    if plan.approximate:
        marker = phase_marker(store, spec.output, plan.phase_range("index")[0], job_id)
        if not marker.outcome_as(VectorShard).declined:
            return search_approximate(spec, plan, shard, store, marker, on_progress)
    return search_exact(spec, plan, shard, store, on_progress)
