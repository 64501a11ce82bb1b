"""A whole job in one process, without Redis or Celery: plan, run every shard, publish.

Unit tests and bench/ use it to drive the real shard path; the distributed path
(submit -> Celery -> tasks -> finalize) writes the same job folder and the same record.
"""

from __future__ import annotations

import json
import time

from orchestrator import __version__
from orchestrator.finalize import marker_parts, model_fields, publish
from orchestrator.jobs import JobSpec
from orchestrator.outputs import job_dir, new_job_id, spec_digest
from orchestrator.manifest import write_manifests
from orchestrator.planner import plan
from orchestrator.storage import relative_key
from workers.context import WorkerContext
from workers.runner import run_shard


def run_local(spec: JobSpec, ctx: WorkerContext, job_id: str | None = None) -> tuple[str, list[dict]]:
    """Run every shard of `spec` here and publish the job; returns its id and commit markers."""
    job_id = job_id or new_job_id()
    started = time.time()
    folder = job_dir(spec.output, job_id)
    job_plan = plan(spec.input, spec.shard_size, ctx.store)
    write_manifests(job_plan, folder, ctx.store)
    spec_json = spec.model_dump_json()
    fields = {"job_id": job_id, "spec_sha256": spec_digest(spec_json)}
    local = spec.model_copy(update={"output": folder})
    markers = [run_shard(local, shard, ctx, marker_fields=fields) for shard in range(job_plan.n_shards)]
    summary = {
        **fields, "kind": spec.kind, "job_dir": relative_key(spec.output, folder),
        "items": sum(m["rows"] for m in markers), "processed": sum(m["rows"] for m in markers),
        "errors": sum(m["errors"] for m in markers), "shards": len(markers), "failed_shards": {},
        "wall_s": round(time.time() - started, 3), **model_fields(markers), "vitbatch_version": __version__, "finished_at": time.time(),
        "parts": [part for marker in markers for part in marker_parts(spec.output, folder, marker)],
    }
    publish(ctx.store, spec.output, summary, True, json.loads(spec_json))
    return job_id, markers
