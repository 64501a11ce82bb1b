"""Incremental runs: recompute only what changed since the previous committed run.

An item is carried over when its object is unchanged (same key and ETag; for file://
the ETag is mtime+size) and the model is unchanged (same model identity: the files
of the model directory and their ETags, which cover weights and preprocessing).
Carried rows are copied from the previous run's committed parts into
`carried-00000.parquet`, committed with its own marker, so readers see one job.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.constants import COMMIT_DIR, JOB_SPEC_FILE
from orchestrator.errors import SpecError, StorageError
from orchestrator.modelinfo import model_dir
from orchestrator.planner import Plan
from orchestrator.results import read_table
from orchestrator.storage import ObjectStore, join, relative_key

CARRIED_PART = "carried-00000.parquet"


def resolve_alias(ref: str, store: ObjectStore) -> str:
    """`alias:URI` -> the model reference written in the pointer object at URI."""
    if not ref.startswith("alias:"):
        return ref
    pointer = ref.split(":", 1)[1]
    try:
        target = store.read(pointer).decode().strip()
    except StorageError as e:
        raise SpecError(f"model alias {pointer} cannot be read ({e}); a finetune job with --alias writes it") from e
    if not target or target.startswith("alias:"):
        raise SpecError(f"model alias {pointer} holds {target!r}, not a model reference")
    return target


def model_identity(ref: str, store: ObjectStore) -> str:
    """Changes exactly when the model directory's files change; hub names are taken at their word."""
    directory = model_dir(ref)
    if directory is None:
        return "ref:" + ref
    digest = hashlib.sha256()
    for info in store.list(directory):
        digest.update(f"{relative_key(directory, info.uri)}\t{info.etag}\n".encode())
    return "sha256:" + digest.hexdigest()


def previous_identity(previous_output: str, store: ObjectStore) -> str | None:
    try:
        return json.loads(store.read(join(previous_output, JOB_SPEC_FILE))).get("model_identity")
    except StorageError:
        return None


def carry_over(job_plan: Plan, previous_output: str, output: str, identity: str, store: ObjectStore) -> int:
    """Drop unchanged items from the plan and commit their previous rows under `output`."""
    if previous_identity(previous_output, store) != identity:
        return 0  # a new model reclassifies everything once
    try:
        previous = read_table(previous_output, store)
    except FileNotFoundError:
        return 0
    etags = dict(zip(previous.column("key").to_pylist(), previous.column("etag").to_pylist()))
    unchanged = {item.key for item in job_plan.items if item.etag and etags.get(item.key) == item.etag}
    if not unchanged:
        return 0
    carried = previous.filter(pc.is_in(previous.column("key"), pa.array(sorted(unchanged))))
    job_plan.items = [item for item in job_plan.items if item.key not in unchanged]
    buffer = io.BytesIO()
    pq.write_table(carried, buffer, compression="zstd")
    data = buffer.getvalue()
    store.write(join(output, CARRIED_PART), data)
    n_errors = carried.num_rows - carried.column("error").null_count
    marker = {"shard": "carried", "parts": {CARRIED_PART: {"bytes": len(data)}}, "rows": carried.num_rows,
              "errors": n_errors, "carried_from": previous_output}
    store.write(join(output, COMMIT_DIR, "carried-00000.json"), json.dumps(marker, indent=2).encode())
    return carried.num_rows
