"""A shard of a dedup or neighbors job, one way: plan -> the phase's work -> parts -> commit marker.

`run_vector_shard` is the plain function the task calls (and tests); `run_vectors_local` runs a
whole job in one process without Redis or Celery, writing the same job folder and record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from orchestrator import __version__
from orchestrator.inputs.vectorplan import VectorPlan, plan_vectors
from orchestrator.jobspec.jobs import DedupSpec, NeighborsSpec
from orchestrator.lifecycle.commits import JobRecord, ShardMarker
from orchestrator.lifecycle.finalize import publish
from orchestrator.published.outputs import job_dir, new_job_id, spec_digest
from orchestrator.store.storage import ObjectStore, relative_key
from workers.writers import commit_shard

ProgressFn = Callable[[int, int], None]
VectorSpec = DedupSpec | NeighborsSpec


def run_vector_shard(spec: VectorSpec, shard: int, store: ObjectStore, marker_fields: dict, token: int = 0,
                     on_progress: ProgressFn | None = None) -> ShardMarker:
    """Compute one shard of the job whose folder is `spec.output` and commit it; returns the marker."""
    plan = VectorPlan.read(spec.output, store)
    job_id = marker_fields["job_id"]
    start = time.perf_counter()
    if spec.kind == "dedup":
        from workers.curation.dedupshards import run_dedup_shard

        parts, fields = run_dedup_shard(spec, plan, shard, store, job_id, token, on_progress)
    else:
        from workers.curation.neighborshards import run_neighbors_shard

        parts, fields = run_neighbors_shard(spec, plan, shard, store, job_id, token, on_progress)
    compute_s = time.perf_counter() - start
    summary = {**marker_fields, "rows": fields.pop("rows"), "errors": 0, "phase": plan.phase(shard)[0],
               "model_fingerprint": plan.source.model_fingerprint, **fields}
    return commit_shard(store, spec.output, shard, parts, {**summary, "stats": {"compute_s": round(compute_s, 4)}})


def run_vectors_local(spec: VectorSpec, store: ObjectStore,
                      job_id: str | None = None) -> tuple[str, list[ShardMarker]]:
    """Plan, run every shard in phase order here, and publish the job; returns its id and markers."""
    job_id = job_id or new_job_id()
    started = time.time()
    folder = job_dir(spec.output, job_id)
    plan = plan_vectors(spec, store)
    plan.write(folder, store)
    spec_json = spec.model_dump_json()
    fields = {"job_id": job_id, "spec_sha256": spec_digest(spec_json)}
    local = spec.model_copy(update={"output": folder})
    markers = [run_vector_shard(local, shard, store, fields) for shard in range(plan.n_shards)]
    rows = sum(m.rows for m in markers)
    finished = time.time()
    record = JobRecord.build(
        job_id=job_id, spec_sha256=fields["spec_sha256"], kind=spec.kind, job_dir=relative_key(spec.output, folder),
        markers=markers, items=rows, processed=rows, errors=0, shards=len(markers), failed_shards={}, carried=0,
        wall_s=finished - started, finished_at=finished, version=__version__,
    )
    publish(store, spec.output, record.to_json(), True, json.loads(spec_json))
    return job_id, markers
