"""A shard of a dedup or neighbors job, one way: plan -> the phase's work -> parts -> commit marker.

`run_vector_shard` is the plain function a unit's work calls (workers/lifecycle.vector_work), queued
or in process (workers/inprocess.run_vectors_local: the whole job through the same lifecycle).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.jobspec.vectorspecs import DedupSpec, NeighborsSpec
from orchestrator.lifecycle.commits import JobStamp, ShardMarker
from orchestrator.store.storage import ObjectStore
from workers.writers import commit_shard

ProgressFn = Callable[[int, int], None]
VectorSpec = DedupSpec | NeighborsSpec


def run_vector_shard(spec: VectorSpec, shard: int, store: ObjectStore, stamp: JobStamp, token: int = 0,
                     on_progress: ProgressFn | None = None) -> ShardMarker:
    """Compute one shard of the job whose folder is `spec.output` and commit it; returns the marker."""
    plan = VectorPlan.read(spec.output, store)
    job_id = stamp.job_id
    start = time.perf_counter()
    if spec.kind == "dedup":
        from workers.curation.dedupshards import run_dedup_shard

        parts, work = run_dedup_shard(spec, plan, shard, store, job_id, token, on_progress)
    else:
        from workers.curation.neighborshards import run_neighbors_shard

        parts, work = run_neighbors_shard(spec, plan, shard, store, job_id, token, on_progress)
    compute_s = time.perf_counter() - start
    work = replace(work, model_fingerprint=plan.source.model_fingerprint, stats={"compute_s": round(compute_s, 4)})
    return commit_shard(store, spec.output, shard, parts, stamp, work)
