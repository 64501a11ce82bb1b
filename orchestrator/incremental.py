"""Incremental runs: recompute only what changed since the previous committed run.

An item is carried over when its object is unchanged (same key and ETag; for file://
the ETag is mtime+size) and the model is unchanged (same `modelrefs.model_identity`: the
files of the model directory and their ETags, which cover weights and preprocessing).
Carried rows are copied from the previous run's committed parts into
`carried-00000.parquet`, committed with its own marker, so readers see one job.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.commits import ShardMarker, table_bytes, upload_parts, write_marker
from orchestrator.constants import CARRIED_MARKER, CARRIED_PART, JOB_SPEC_FILE
from orchestrator.errors import OutputNotFound
from orchestrator.planner import Plan
from orchestrator.results import read_json, read_table, success_record
from orchestrator.storage import ObjectStore, join


def previous_identity(previous_output: str, store: ObjectStore) -> str | None:
    """The model identity the previous run's succeeded job was submitted with."""
    try:
        record = success_record(previous_output, store)
    except OutputNotFound:
        return None
    job_record = read_json(store, join(previous_output, record["job_dir"], JOB_SPEC_FILE)) or {}
    return job_record.get("model_identity")


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
    write_marker(store, folder, ShardMarker.build("carried", written, {
        "job_id": job_id, "rows": carried.num_rows, "errors": n_errors, "carried_from": previous_output}),
        name=CARRIED_MARKER)
    return carried.num_rows
