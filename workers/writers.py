"""Shard outputs: the part files under deterministic keys in the job's folder, then the commit marker.

The marker is written last, so a marker's presence means the parts are whole. A
redelivered shard rewrites the same keys with the same rows: exactly-once output
on top of at-least-once delivery. A marker names its job; one of another job is
never honoured (its folder is another job's anyway). The records themselves are
typed in orchestrator/lifecycle/commits.py, which the control plane reads with the same code.
"""

from __future__ import annotations

from orchestrator.constants import commit_name
from orchestrator.lifecycle.commits import (
    JobStamp,
    PartEntry,
    ShardMarker,
    ShardWork,
    parquet_bytes,
    read_marker,
    upload_parts,
    write_marker,
)
from orchestrator.store.storage import ObjectStore

__all__ = ["commit_shard", "parquet_bytes", "read_commit", "upload_parts", "written_files"]


def commit_shard(store: ObjectStore, folder: str, shard: int, parts: dict[str, bytes], stamp: JobStamp,
                 work: ShardWork, written: dict[str, PartEntry] | None = None) -> ShardMarker:
    """Write each part (name -> bytes) into the job's folder, then the marker naming them with their sha256.

    `stamp` names the job; `work` is what the shard's work reported (rows, errors, the kind's outcome);
    `written`: parts already uploaded (name -> PartEntry).
    """
    written = {**(written or {}), **upload_parts(store, folder, parts)}
    return write_marker(store, folder, ShardMarker.build(shard, written, stamp, work))


def read_commit(store: ObjectStore, folder: str, shard: int, job_id: str) -> ShardMarker | None:
    """The shard's marker when this job wrote it; None when missing or another job's (stale)."""
    return read_marker(store, folder, commit_name(shard), job_id)


def written_files(store: ObjectStore, folder: str) -> dict[str, PartEntry]:
    """What a single-task job (finetune, evaluate) wrote into its folder, for its marker:
    not its own records (`_*`) nor resumable checkpoints."""
    from orchestrator.jobspec.modelrefs import model_files
    from orchestrator.store.storage import relative_key

    return {relative_key(folder, info.uri): PartEntry.of(store.read(info.uri)) for info in model_files(folder, store)}
