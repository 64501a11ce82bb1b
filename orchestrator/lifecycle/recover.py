"""Rebuild a job's ledger entry from its output, after Redis lost it (emptied, or a new instance).

A job's folder (`<output>/_jobs/<job id>/`) holds what the ledger was built from at submit:
`_job.json` (the spec, its digest, the plan's counts and the submit time), one manifest per
shard, and one commit marker per shard that committed (its rows, error rows and stage seconds).
`recover` registers the job again under its own id from those: the committed shards as
committed, with their counts; the others as pending, enqueued again (they run from their
manifests; a delivery that finds its shard's marker only records it). Lease tokens restart above
any granted before, so a delivery from before the loss writes nothing more.

Not recovered: the progress of shards that had not committed (they run again from the start),
delivery attempts and failure reasons (quarantine counts start over), and items counted inside
`.tar` shards that had not committed (the total grows again as they run). Classify, embed and
attention jobs only: the phased and single-task kinds are submitted again with `--overwrite`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.constants import JOB_SPEC_FILE, SUCCESS_FILE, commit_name, manifest_name
from orchestrator.errors import JobNotFound, SpecError
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.kinds import job_kind
from orchestrator.jobspec.submitted import SubmittedJob, read_submitted
from orchestrator.lifecycle.commits import ShardMarker, read_marker
from orchestrator.lifecycle.finalize import finalize
from orchestrator.published.outputs import job_dir, spec_digest
from orchestrator.published.results import prefix_holder, read_record
from orchestrator.store.storage import ObjectStore, join


@dataclass(frozen=True)
class Recovered:
    """What `recover` registered: the job, its committed shards and the shards it enqueued again."""

    job_id: str
    kind: str
    output: str
    committed: list[int]
    enqueued: list[int]
    carried: int


def recover(client, output: str, job_id: str | None = None) -> Recovered:
    """Register the job that holds `output` (or `job_id`'s, under it) again; SpecError when its
    records are missing or it needs no recovery (Redis knows it, or it is published)."""
    store, ledger = client.store, client.ledger
    job_id = job_id or _holder(output, store)
    record = _job_record(output, job_id, store)
    spec = parse_spec(record.spec)
    spec_json = spec.model_dump_json()
    if spec_digest(spec_json) != record.spec_sha256:
        raise SpecError(f"job {job_id}'s _job.json does not match its spec digest: not recovered")
    if not job_kind(spec.kind).runs_shards:  # only image shards are planned into manifests at submit
        raise SpecError(f"job {job_id} is a {spec.kind} job: recover rebuilds classify, embed and attention "
                        f"jobs; submit it again with --overwrite")
    _check_lost(client, job_id, spec.output)
    n_shards = record.shards
    markers = _markers(store, job_dir(spec.output, job_id), job_id, n_shards)
    ledger.hold_output(spec.output, job_id)
    ledger.restore(job_id, spec_json, spec.kind, spec.output, record.items, n_shards,
                   carried=record.carried, created_at=record.submitted_at,
                   committed={i: (m.rows, m.errors, m.stats) for i, m in markers.items()},
                   lease_floor=int(time.time()))
    pending = [i for i in range(n_shards) if i not in markers]
    if pending:
        client.enqueue(job_id, pending, spec.kind, client.queue_for(spec, n_shards))
    else:  # every shard had committed: only the publication was lost
        finalize(job_id, ledger, store)
    return Recovered(job_id, spec.kind, spec.output, sorted(markers), pending, record.carried)


def _holder(output: str, store: ObjectStore) -> str:
    record = prefix_holder(output, store)
    if record is None or not record.job_id:
        raise SpecError(f"no {JOB_SPEC_FILE} at {output}: nothing was submitted there (check the output prefix)")
    return record.job_id


def _job_record(output: str, job_id: str, store: ObjectStore) -> SubmittedJob:
    record = read_submitted(store, join(job_dir(output, job_id), JOB_SPEC_FILE))
    if record is None or record.job_id != job_id:
        raise SpecError(f"no record of job {job_id} at {job_dir(output, job_id)} ({JOB_SPEC_FILE} is missing): "
                        "it cannot be recovered; submit it again with --overwrite")
    return record


def _check_lost(client, job_id: str, output: str) -> None:
    """SpecError unless Redis has lost the job and the job has not published its record."""
    try:
        state = client.ledger.status(job_id).state
    except JobNotFound:
        published = read_record(client.store, join(output, SUCCESS_FILE))
        if published is not None and published.job_id == job_id:
            raise SpecError(f"job {job_id} succeeded and published {join(output, SUCCESS_FILE)}: nothing to recover") from None
        return
    raise SpecError(f"job {job_id} is in Redis ({state.value}): nothing to recover (`vitbatch retry {job_id}` "
                    "re-enqueues its failed or missing shards)")


def _markers(store: ObjectStore, folder: str, job_id: str, n_shards: int) -> dict[int, ShardMarker]:
    """This job's commit markers by shard; SpecError when a shard that did not commit has no manifest."""
    markers = {}
    for shard in range(n_shards):
        marker = read_marker(store, folder, commit_name(shard), job_id)
        if marker is not None:
            markers[shard] = marker
        elif not store.exists(join(folder, manifest_name(shard))):
            raise SpecError(f"job {job_id}: shard {shard} has neither a commit marker nor a manifest in {folder}: "
                            "it cannot be recovered; submit it again with --overwrite")
    return markers
