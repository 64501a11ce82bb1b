"""Incremental runs: recompute only what changed since the previous committed run.

An item is carried over when its object is unchanged (same key and ETag; for file://
the ETag is mtime+size) and the model is unchanged (same `modelrefs.model_identity`: the
files of the model directory and their ETags, which cover weights and preprocessing).
Carried rows are copied from the previous run's committed parts into
`carried-00000.parquet`, committed with its own marker, so readers see one job.

The identity a run is compared with is the one its `_job.json` recorded; `submitted_job`, the one
builder of that record for queued and in-process jobs alike, records it for every kind that runs
image shards, so any such output can be a later run's previous one.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator import __version__
from orchestrator.constants import CARRIED_MARKER, CARRIED_PART, JOB_SPEC_FILE
from orchestrator.errors import OutputNotFound
from orchestrator.inputs.planner import Plan
from orchestrator.jobspec.jobs import JobSpec
from orchestrator.jobspec.kinds import job_kind
from orchestrator.jobspec.modelrefs import model_identity
from orchestrator.jobspec.submitted import SubmittedJob, read_submitted
from orchestrator.lifecycle.commits import (
    CarriedOver,
    JobStamp,
    ShardMarker,
    ShardWork,
    table_bytes,
    upload_parts,
    write_marker,
)
from orchestrator.published.outputs import spec_digest
from orchestrator.published.results import read_table, success_record
from orchestrator.store.storage import ObjectStore, join


def submitted_job(job_id: str, spec: JobSpec, plan: dict[str, Any], store: ObjectStore, *,
                  model_alias: str | None = None, identity: str | None = None) -> SubmittedJob:
    """The one builder of `_job.json`, queued and in-process alike. A kind that runs image shards
    records its model's identity (computed here unless the caller has it already)."""
    model = getattr(spec, "model", None)  # every image-shard spec has one
    if identity is None and model is not None and job_kind(spec.kind).runs_shards:
        identity = model_identity(model, store)
    spec_json = spec.model_dump_json()
    return SubmittedJob(job_id=job_id, spec_sha256=spec_digest(spec_json), spec=json.loads(spec_json), plan=plan,
                        model_alias=model_alias, model_identity=identity, vitbatch_version=__version__,
                        submitted_at=time.time())


def previous_identity(previous_output: str, store: ObjectStore) -> str | None:
    """The model identity the previous run's succeeded job was submitted with."""
    try:
        record = success_record(previous_output, store)
    except OutputNotFound:
        return None
    submitted = read_submitted(store, join(previous_output, record.job_dir, JOB_SPEC_FILE))
    return submitted.model_identity if submitted is not None else None


def carry_over(job_plan: Plan, previous_output: str, folder: str, identity: str, store: ObjectStore,
               job_id: str) -> int:
    """Drop unchanged items from the plan and commit their previous rows in this job's `folder`."""
    if previous_identity(previous_output, store) != identity:
        return 0  # a new model reclassifies everything once
    try:
        previous = read_table(previous_output, store)
    except OutputNotFound:
        return 0
    etags = dict(zip(previous.column("key").to_pylist(), previous.column("etag").to_pylist()))
    unchanged = {item.key for item in job_plan.items if item.etag and etags.get(item.key) == item.etag}
    if not unchanged:
        return 0
    carried = previous.filter(pc.is_in(previous.column("key"), pa.array(sorted(unchanged))))
    job_plan.items = [item for item in job_plan.items if item.key not in unchanged]
    written = upload_parts(store, folder, {CARRIED_PART: table_bytes(carried)})
    n_errors = carried.num_rows - carried.column("error").null_count
    work = ShardWork(rows=carried.num_rows, errors=n_errors, outcome=CarriedOver(previous_output))
    write_marker(store, folder, ShardMarker.build("carried", written, JobStamp(job_id), work), name=CARRIED_MARKER)
    return carried.num_rows
