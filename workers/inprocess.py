"""A whole job in one process, without Redis or Celery: plan, run every shard, publish.

Unit tests and bench/ use it to drive the real shard path; the distributed path
(submit -> Celery -> tasks -> finalize) writes the same job folder and the same records:
`_job.json` in the job's folder and at the prefix, the shards' markers, and the job's
record built by the same `JobRecord` (orchestrator/lifecycle/commits.py) that finalize builds.
"""

from __future__ import annotations

import time

from orchestrator import __version__
from orchestrator.constants import JOB_SPEC_FILE
from orchestrator.inputs.manifest import write_manifests
from orchestrator.inputs.planner import plan_job
from orchestrator.jobspec.jobs import InferenceSpec
from orchestrator.lifecycle.commits import JobRecord
from orchestrator.lifecycle.finalize import publish
from orchestrator.published.outputs import job_dir, new_job_id
from orchestrator.store.storage import join, relative_key
from orchestrator.submission.incremental import submitted_job
from workers.context import WorkerContext
from workers.runner import run_shard


def run_local(spec: InferenceSpec, ctx: WorkerContext, job_id: str | None = None) -> tuple[str, list]:
    """Run every shard of `spec` here and publish the job; returns its id and commit markers."""
    job_id = job_id or new_job_id()
    started = time.time()
    folder = job_dir(spec.output, job_id)
    job_plan = plan_job(spec, ctx.store)
    submitted = submitted_job(job_id, spec, {**job_plan.summary(), "carried": 0}, ctx.store)
    fields = {"job_id": job_id, "spec_sha256": submitted.spec_sha256}
    job_record = submitted.to_bytes()  # the queued path's record, built by the same function
    ctx.store.write(join(folder, JOB_SPEC_FILE), job_record)
    ctx.store.write(join(spec.output, JOB_SPEC_FILE), job_record)
    write_manifests(job_plan, folder, ctx.store)
    local = spec.model_copy(update={"output": folder})
    markers = [run_shard(local, shard, ctx, marker_fields=fields) for shard in range(job_plan.n_shards)]
    rows = sum(m.rows for m in markers)
    finished = time.time()
    record = JobRecord.build(
        job_id=job_id, spec_sha256=fields["spec_sha256"], kind=spec.kind, job_dir=relative_key(spec.output, folder),
        markers=markers, items=rows, processed=rows, errors=sum(m.errors for m in markers), shards=len(markers),
        failed_shards={}, carried=0, wall_s=finished - started, finished_at=finished, version=__version__,
    )
    publish(ctx.store, spec.output, record.to_json(), True, submitted.spec)
    return job_id, markers
