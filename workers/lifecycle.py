"""A unit's life, one way, for every runner: no Celery here.

The Celery tasks (tasks.py, vectortasks.py) run it over the Redis ledger, the in-process runner
(inprocess.py, and bench/ through it) over the in-memory one; the ledger is the context's
(`ctx.ledger`, a JobLedger: orchestrator/lifecycle/ledgers.py). A unit's life: skip an ended job;
if the unit's commit marker exists, only record it (a crash lost the ack); take the unit's lease,
counting the delivery, and quarantine the unit after too many; run the work with a heartbeat;
commit; settle the job, and finalize it when this unit was the last (record, `_job.json` already
written at submit, publication claim: orchestrator/lifecycle/finalize.py). Every ledger write after
the lease is fenced by it (orchestrator/lifecycle/fencing.py).

What a unit's work is, per unit kind (`JobKind.unit`), is built here too, so both edges run the
same function: `images` a shard through runner.run_shard, `vectors` a dedup or neighbors shard,
`single` one task whose files are the job's output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis import RedisError

from orchestrator.errors import NotRetryable, StaleDelivery
from orchestrator.jobspec.jobs import JobSpec, parse_spec
from orchestrator.jobspec.kinds import job_kind
from orchestrator.lifecycle.commits import JobStamp, ShardMarker
from orchestrator.lifecycle.fencing import Lease
from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.outputs import job_dir, spec_digest
from workers.context import WorkerContext
from workers.errors import JobCancelled, ShardFailed
from workers.progress import Announce, Heartbeat, progress_reporter, training_reporter
from workers.writers import commit_shard, read_commit, written_files

log = logging.getLogger(__name__)

# work(spec with output = the job's folder, ctx, what names the job in its marker, the delivery's lease) -> its marker
Work = Callable[[JobSpec, WorkerContext, JobStamp, Lease], ShardMarker]
Settle = Callable[[str], object]


def run_unit(ctx: WorkerContext, job_id: str, unit: int, work: Work, backoff_s: float = 0.0,
             settle: Settle | None = None) -> dict:
    """Skip an ended job; honour this job's own marker; take the unit's lease (counting the
    delivery); work; commit under the lease; settle (`settle(job_id)` once every unit has,
    finalize by default). Errors are the caller's to map (tasks.execute, the in-process runner)."""
    ledger = ctx.ledger
    if ledger.state(job_id).terminal:
        return {"shard": unit, "skipped": "job is no longer running"}
    spec_json = ledger.spec_json(job_id)
    spec = parse_spec(spec_json)
    # Everything this job writes goes into its own folder under the output prefix.
    local = spec.model_copy(update={"output": job_dir(spec.output, job_id)})
    stamp = JobStamp(job_id, spec_digest(spec_json))
    settle = settle or (lambda settled_job: finalize(settled_job, ctx.ledger, ctx.store))
    marker = read_commit(ctx.store, local.output, unit, job_id)
    if marker is None and job_kind(spec.kind).exclusive and held_elsewhere(ctx, job_id, unit):
        # Redis redelivered a training that is still alive elsewhere (past its visibility
        # timeout): two trainers on one output would fight; the reconciler covers a real death.
        return {"shard": unit, "skipped": "another worker is training this job"}
    if marker is None:
        lease = ledger.start_shard(job_id, unit)
        if lease.attempts > ctx.settings.max_attempts:
            _quarantine(ctx, lease, settle)
        marker = _fenced_work(ctx, lease, lambda: work(local, ctx, stamp, lease), backoff_s)
    else:  # a crash lost the ack: the marker only needs recording, under a lease of its own
        lease = ledger.start_shard(job_id, unit, count=False)
    if ledger.record_commit(lease, marker.rows, marker.errors, marker.stats):
        settle(job_id)
    return {"shard": unit, "rows": marker.rows, "errors": marker.errors}


def _fenced_work(ctx: WorkerContext, lease: Lease, run: Callable[[], ShardMarker], backoff_s: float) -> ShardMarker:
    """The work, heartbeating; whatever stops it is recorded under the delivery's lease, so a
    delivery that was handed on (StaleDelivery) records nothing."""
    job_id, shard = lease.job_id, lease.shard
    try:
        with Heartbeat(ctx, lease):
            return run()
    except JobCancelled:
        ctx.ledger.stand_down(lease)  # pending again: `vitbatch retry` runs it
        raise
    except NotRetryable as e:
        log.error("job %s failed: %s", job_id, e)
        if not ctx.ledger.set_state(job_id, JobState.FAILED, str(e), lease=lease):
            raise StaleDelivery(f"job {job_id} shard {shard}: not this delivery's to fail ({e})") from None
        raise ShardFailed(f"job {job_id} failed: {e}") from e  # the cause: what the in-process runner raises
    except (StaleDelivery, ShardFailed, RedisError):  # Redis down or full: the Celery edge rides it out
        raise
    except Exception as e:
        ctx.ledger.note_shard_error(job_id, shard, f"{type(e).__name__}: {e}")
        # Not held by anyone during the backoff, but not silent either: the reconciler waits it out.
        ctx.ledger.hold_for(lease, backoff_s)  # StaleDelivery: no retry, the shard is elsewhere
        raise


def held_elsewhere(ctx: WorkerContext, job_id: str, unit: int) -> bool:
    """Whether another live delivery runs the unit now (its heartbeat is fresh)."""
    states, beats = ctx.ledger.shard_states(job_id), ctx.ledger.heartbeats(job_id)
    beat, now = beats.get(unit, 0), ctx.ledger.now()  # beats are stamped by the ledger's clock
    fresh = beat <= now and now - beat < 3 * ctx.settings.heartbeat_s  # a future beat is a retry's backoff
    return states.get(unit) is ShardState.RUNNING and fresh


def _quarantine(ctx: WorkerContext, lease: Lease, settle: Settle) -> None:
    job_id, shard = lease.job_id, lease.shard
    reason = f"quarantined after {lease.attempts - 1} deliveries that did not commit"
    last = ctx.ledger.last_shard_error(job_id, shard)
    reason += f"; last error: {last}" if last else ""
    log.error("job %s shard %s %s", job_id, shard, reason)
    if ctx.ledger.fail_shard(lease, reason):
        settle(job_id)
    raise ShardFailed(f"job {job_id} shard {shard} {reason}")


# -- what a unit's work is, per unit kind ----------------------------------------------------
def image_work(shard: int, announce: Announce) -> Work:
    """An `images` unit: the shard path (runner.run_shard); tars' items found are counted in the ledger."""
    from workers.runner import run_shard

    def work(spec: JobSpec, ctx: WorkerContext, stamp: JobStamp, lease: Lease) -> ShardMarker:
        return run_shard(spec, shard, ctx, progress_reporter(ctx, lease, announce),  # type: ignore[arg-type]
                         job_id=lease.job_id, stamp=stamp,
                         on_found=lambda n_items: ctx.ledger.shard_items(lease.job_id, shard, n_items))

    return work


def vector_work(shard: int, announce: Announce) -> Work:
    """A `vectors` unit: one shard of a dedup or neighbors job's phase."""
    from workers.curation.vectorshards import run_vector_shard

    def work(spec: JobSpec, ctx: WorkerContext, stamp: JobStamp, lease: Lease) -> ShardMarker:
        return run_vector_shard(spec, shard, ctx.store, stamp, lease.token,  # type: ignore[arg-type]
                                progress_reporter(ctx, lease, announce))

    return work


def single_work(run: Callable, announce: Announce) -> Work:
    """A `single` unit (finetune, evaluate, export): one run whose files, all of them, are the job's output."""
    def work(spec: JobSpec, ctx: WorkerContext, stamp: JobStamp, lease: Lease) -> ShardMarker:
        report = run(spec, lease.job_id, ctx, training_reporter(ctx, lease, announce))
        return commit_shard(ctx.store, spec.output, 0, {}, stamp, report,
                            written=written_files(ctx.store, spec.output))

    return work


def unit_work(kind: str, unit: int, announce: Announce) -> Work:
    """The work of unit `unit` of a job of `kind`, for a kind whose units are shards (`images`,
    `vectors`); a `single` kind's work names its run function (tasks.py)."""
    unit_kind = job_kind(kind).unit
    if unit_kind == "images":
        return image_work(unit, announce)
    if unit_kind == "vectors":
        return vector_work(unit, announce)
    raise ValueError(f"a {kind} job is one task: its work is single_work(<its run function>)")
