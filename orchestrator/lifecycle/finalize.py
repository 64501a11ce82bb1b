"""Close a job once every shard has settled: publish its record (_SUCCESS.json or _FAILURES.json).

The record lists every committed part of this job (name, sha256, rows), read from this
job's own commit markers. Writing it at the prefix is the job's one atomic commit, made once
(a claim in the ledger); only a succeeded job replaces `_SUCCESS.json`, and only then are the
folders of the ended, earlier jobs it replaced removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from orchestrator import __version__
from orchestrator.constants import CARRIED_MARKER, FAILURES_FILE, commit_name
from orchestrator.errors import JobNotFound, StorageError
from orchestrator.jobspec.kinds import job_kind
from orchestrator.lifecycle.commits import JobRecord, ShardMarker, read_marker
from orchestrator.lifecycle.fencing import Publication
from orchestrator.lifecycle.ledgers import JobLedger
from orchestrator.lifecycle.states import JobState, JobStatus, ShardState
from orchestrator.published.delta import retained_jobs
from orchestrator.published.outputs import job_dir, remove_superseded, spec_digest
from orchestrator.published.publication import publish
from orchestrator.store.storage import ObjectStore, join, relative_key

log = logging.getLogger(__name__)


def committed_markers(job_id: str, output: str, ledger: JobLedger, store: ObjectStore,
                      carried: int) -> list[ShardMarker]:
    """This job's own commit markers, in shard order (carried-over rows first)."""
    folder = job_dir(output, job_id)
    names = [CARRIED_MARKER] if carried else []
    states = ledger.shard_states(job_id)
    names += [commit_name(i) for i in sorted(states) if states[i] is ShardState.COMMITTED]
    markers = []
    for name in names:
        marker = read_marker(store, folder, name, job_id)
        if marker is None:
            raise StorageError(f"job {job_id}: commit marker {name} is missing from {folder}")
        markers.append(marker)
    return markers


def finalize(job_id: str, ledger: JobLedger, store: ObjectStore) -> JobState:
    """Publish the job's record once and end it; the job's state afterwards.

    Whoever finalizes (the last worker, the reconciler, both at once) reads the same ledger and
    markers, but only the one that claims the publication writes (fencing.py): a job that has
    ended is never published again, and a second publisher taking over a dead one writes the
    same bytes (the finish time is fixed at the first claim)."""
    status = ledger.status(job_id)
    if status.state.terminal:
        return status.state
    folder = job_dir(status.output, job_id)
    markers = committed_markers(job_id, status.output, ledger, store, status.carried)
    spec_json = ledger.spec_json(job_id)
    claim = ledger.claim_publication(job_id)
    if claim is None:  # ended meanwhile, reopened, or another publisher is at it
        return ledger.state(job_id)
    try:
        return _publish_claimed(claim, status, folder, markers, spec_json, ledger, store)
    except BaseException:
        ledger.release_publication(claim)  # nothing was recorded: the next finalize goes again
        raise


def _publish_claimed(claim: Publication, status: JobStatus, folder: str, markers: list[ShardMarker], spec_json: str,
                     ledger: JobLedger, store: ObjectStore) -> JobState:
    job_id = status.job_id
    wall_s = claim.finished_at - status.created_at
    record = JobRecord.build(
        job_id=job_id, spec_sha256=spec_digest(spec_json), kind=status.kind,
        job_dir=relative_key(status.output, folder), markers=markers, items=status.n_items, processed=status.done,
        errors=status.errors, shards=status.n_shards, failed_shards=status.failed_shards, carried=status.carried,
        wall_s=wall_s, finished_at=claim.finished_at, version=__version__,
        shard_stats=list(ledger.shard_stats(job_id).values()), makes_model=job_kind(status.kind).makes_model,
    )  # with what the kind adds (dedup: kept and removed per cluster; neighbors: mode, recall)
    if claim.prefix_holder not in ("", job_id):  # another job took the prefix: it is not this job's to write
        store.write(join(folder, FAILURES_FILE), record.to_bytes())
        ledger.set_state(job_id, JobState.FAILED, f"job {claim.prefix_holder} took {status.output} before this "
                         f"job could publish; its record is in {folder}", publication=claim)
        return ledger.state(job_id)
    state = JobState.SUCCEEDED if not status.failed_shards else JobState.FINISHED_WITH_FAILURES
    succeeded = state is JobState.SUCCEEDED
    publish(store, status.output, record, succeeded, json.loads(spec_json))
    if succeeded:  # before the job is seen to end: `vitbatch wait` returning means the old folders are gone
        _remove_replaced(status, store, ledger)
    reason = "" if succeeded else f"{len(status.failed_shards)} shard(s) failed"
    ledger.set_state(job_id, state, reason, publication=claim)
    return ledger.state(job_id)


def _remove_replaced(status: JobStatus, store: ObjectStore, ledger: JobLedger) -> None:
    """Remove the folders this published job replaced. The output is already published: a cleanup
    that breaks must not keep the job from ending succeeded (its record and its state would
    disagree, and the reconciler would fail a job whose `_SUCCESS.json` names it)."""
    try:
        removable = replaced_by(status.job_id, status.created_at, ledger)
        kept = retained_jobs(status.output, store)  # the table's previous version reads them
        remove_superseded(status.output, status.job_id, store, lambda other: other not in kept and removable(other))
    except Exception as e:  # Redis down or full included: recording the end needs it and is retried
        log.warning("job %s is published at %s, but removing the folders it replaced failed (%s: %s); "
                    "they stay behind, invisible to readers", status.job_id, status.output, type(e).__name__, e)


def replaced_by(job_id: str, created_at: float, ledger: JobLedger) -> Callable[[str], bool]:
    """Which other jobs' folders a success of `job_id` may remove: jobs that have ended and began
    before it. Never a live job (an --overwrite run under way), never a newer one; a job Redis no
    longer knows (expired, or a submit that broke) only when its id says it began in an earlier second."""
    def removable(other: str) -> bool:
        try:
            status = ledger.status(other)
        except JobNotFound:
            return other[:15] < job_id[:15]  # ids begin with their submit time, to the second
        return status.state.terminal and status.created_at < created_at

    return removable
