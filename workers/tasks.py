"""Thin Celery tasks: decode the message, call a plain function, map errors to job state.

Every task has the same life: skip if the job is over; if the unit's commit marker
exists, only record it (a crash lost the ack); take the unit's lease, counting the
delivery, and quarantine the unit after too many; run the work with a heartbeat;
commit; settle the job. Every ledger write after the lease is fenced by it
(orchestrator/lifecycle/fencing.py): a delivery that was handed on, or whose job ended, stops at
its next progress report and writes nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import cache

import redis
from celery import Task

from orchestrator.config import Settings
from orchestrator.constants import (
    QUEUE_TRAIN,
    REDIS_PROBE_KEY,
    TASK_EVALUATE,
    TASK_EXPORT,
    TASK_FINETUNE,
    TASK_RUN_SHARD,
    TASK_SCHEDULED_RUN,
)
from orchestrator.errors import JobNotFound, NotRetryable, StaleDelivery
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.kinds import job_kind
from orchestrator.lifecycle.commits import ShardMarker
from orchestrator.lifecycle.fencing import Lease
from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.outputs import job_dir, spec_digest
from workers.celery import app
from workers.context import WorkerContext
from workers.cores import all_cores
from workers.errors import JobCancelled, ShardFailed
from workers.progress import Heartbeat, progress_reporter, training_reporter
from workers.runner import run_shard as run_shard_fn
from workers.writers import commit_shard, read_commit, written_files

log = logging.getLogger(__name__)


_context_lock = threading.Lock()


@cache
def _context() -> WorkerContext:
    ctx = WorkerContext(Settings())
    for part in ("store", "ledger", "models", "decode_pool"):  # made once here, not raced into being
        getattr(ctx, part)                                    # by two shards in flight
    return ctx


def context() -> WorkerContext:
    with _context_lock:
        return _context()


def _settle(ctx: WorkerContext, job_id: str, all_settled: bool) -> None:
    if all_settled:
        finalize(job_id, ctx.ledger, ctx.store)


def execute(task: Task, job_id: str, shard: int, work: Callable[..., ShardMarker]) -> dict:
    """A unit's task body: `lifecycle` under the task's delivery, its outcome mapped to Celery's
    (acknowledged, retried with backoff, or held while Redis refuses writes)."""
    ctx = context()
    ctx.hostname = task.request.hostname or ""
    _announce(task)
    backoff_s = min(2 ** task.request.retries, 30)
    try:
        return lifecycle(ctx, job_id, shard, work, backoff_s)
    except ShardFailed:
        raise  # Flower shows FAILURE with the reason; the message is acknowledged
    except StaleDelivery as e:
        # Another delivery holds the shard now, or the job has ended: this one wrote nothing
        # after it found out, and its message is acknowledged (the shard's owner has its own).
        log.warning("job %s shard %s stands aside: %s", job_id, shard, e)
        return {"shard": shard, "skipped": str(e)}
    except NotRetryable as e:  # before the delivery held a lease (a spec that no longer parses)
        log.error("job %s failed: %s", job_id, e)
        ctx.ledger.set_state(job_id, JobState.FAILED, str(e))
        raise ShardFailed(f"job {job_id} failed: {e}") from None
    except JobNotFound:
        return {"shard": shard, "skipped": "job unknown to this Redis"}
    except JobCancelled:
        return {"shard": shard, "cancelled": True}  # stood down: `vitbatch retry` runs it again
    except redis.RedisError as e:
        # The ledger cannot record what happened (Redis down or full). Acking now would lose the
        # shard, and requeueing needs a Redis write too (kombu's restore fails on a full Redis and
        # takes the consumer down). So the message stays unacknowledged while Redis refuses
        # writes; once it takes them again the shard is retried. A worker killed meanwhile leaves
        # the message to Redis's visibility timeout.
        log.warning("job %s shard %s: Redis failed (%s); the shard's message is not acknowledged", job_id, shard, e)
        _wait_for_redis_writes(ctx)
        raise task.retry(exc=e, countdown=1, max_retries=None) from e
    except Exception as e:
        # Transient (S3, OOM...): back off and go again; start_shard counts the deliveries
        # and quarantines the shard once they run out.
        log.exception("job %s shard %s failed; retrying", job_id, shard)
        raise task.retry(exc=e, countdown=backoff_s, max_retries=None) from e


def _wait_for_redis_writes(ctx: WorkerContext, poll_s: float = 2.0) -> None:
    """Block until Redis accepts a write again."""
    waited = 0.0
    while True:
        try:
            ctx.ledger.r.set(REDIS_PROBE_KEY, ctx.hostname or "worker", ex=60)
            return
        except redis.RedisError as e:
            if waited % 60 < poll_s:
                log.warning("Redis refuses writes (%s); holding the shard's message for %.0f s so far", e, waited)
        time.sleep(poll_s)
        waited += poll_s


def _announce(task: Task) -> None:
    """Tell Flower the shard is received and started now, from the task's own thread.

    On the solo pool the worker's own task-received/task-started events only leave once the
    task returns, so Flower listed a running shard as unknown (no Received, no Started, last
    page). Flower's state machine never moves a task back, so the late duplicates are harmless.
    """
    try:
        request = task.request
        # (the dispatcher adds hostname, pid, timestamp and the task id itself)
        task.send_event("task-received", name=task.name, args=repr(request.args), kwargs="{}",
                        retries=request.retries)
        task.send_event("task-started")
    except Exception:  # monitoring only: never fail a shard over an event
        log.warning("could not announce task %s to monitors", task.request.id, exc_info=True)


def lifecycle(ctx: WorkerContext, job_id: str, shard: int, work: Callable[..., ShardMarker],
              backoff_s: float = 0.0) -> dict:
    """Skip an ended job; honour this job's own marker; take the shard's lease (counting the
    delivery); work; commit under the lease; settle. `work(spec, ctx, marker_fields, lease)`."""
    if ctx.ledger.state(job_id).terminal:
        return {"shard": shard, "skipped": "job is no longer running"}
    spec_json = ctx.ledger.spec_json(job_id)
    spec = parse_spec(spec_json)
    # Everything this job writes goes into its own folder under the output prefix.
    local = spec.model_copy(update={"output": job_dir(spec.output, job_id)})
    fields = {"job_id": job_id, "spec_sha256": spec_digest(spec_json)}
    marker = read_commit(ctx.store, local.output, shard, job_id)
    if marker is None and job_kind(spec.kind).exclusive and held_elsewhere(ctx, job_id, shard):
        # Redis redelivered a training that is still alive elsewhere (past its visibility
        # timeout): two trainers on one output would fight; the reconciler covers a real death.
        return {"shard": shard, "skipped": "another worker is training this job"}
    if marker is None:
        lease = ctx.ledger.start_shard(job_id, shard)
        if lease.attempts > ctx.settings.max_attempts:
            _quarantine(ctx, lease)
        marker = _fenced_work(ctx, lease, lambda: work(local, ctx, fields, lease), backoff_s)
    else:  # a crash lost the ack: the marker only needs recording, under a lease of its own
        lease = ctx.ledger.start_shard(job_id, shard, count=False)
    settled = ctx.ledger.record_commit(lease, marker.rows, marker.errors, marker.stats)
    _settle(ctx, job_id, settled)
    return {"shard": shard, "rows": marker.rows, "errors": marker.errors}


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
        raise ShardFailed(f"job {job_id} failed: {e}") from None
    except (StaleDelivery, ShardFailed, redis.RedisError):
        raise
    except Exception as e:
        ctx.ledger.note_shard_error(job_id, shard, f"{type(e).__name__}: {e}")
        # Not held by anyone during the backoff, but not silent either: the reconciler waits it out.
        ctx.ledger.hold_for(lease, backoff_s)  # StaleDelivery: no retry, the shard is elsewhere
        raise


def held_elsewhere(ctx: WorkerContext, job_id: str, shard: int) -> bool:
    states, beats = ctx.ledger.shard_states(job_id), ctx.ledger.heartbeats(job_id)
    beat, now = beats.get(shard, 0), ctx.ledger.now()  # beats are stamped by Redis's clock
    fresh = beat <= now and now - beat < 3 * ctx.settings.heartbeat_s  # a future beat is a retry's backoff
    return states.get(shard) is ShardState.RUNNING and fresh


def _quarantine(ctx: WorkerContext, lease: Lease) -> None:
    job_id, shard = lease.job_id, lease.shard
    reason = f"quarantined after {lease.attempts - 1} deliveries that did not commit"
    last = ctx.ledger.last_shard_error(job_id, shard)
    reason += f"; last error: {last}" if last else ""
    log.error("job %s shard %s %s", job_id, shard, reason)
    _settle(ctx, job_id, ctx.ledger.fail_shard(lease, reason))
    raise ShardFailed(f"job {job_id} shard {shard} {reason}")


TASK_OPTIONS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "throws": (ShardFailed,)}


@app.task(name=TASK_RUN_SHARD, **TASK_OPTIONS)
def run_shard(self: Task, job_id: str, shard: int) -> dict:
    return execute(self, job_id, shard, lambda spec, ctx, fields, lease: run_shard_fn(
        spec, shard, ctx, progress_reporter(self, ctx, lease), job_id=job_id, marker_fields=fields,
        on_found=lambda n_items: ctx.ledger.shard_items(job_id, shard, n_items)))


def _single_task(task: Task, job_id: str, run: Callable) -> dict:
    """finetune, evaluate, export: one unit of work whose files, all of them, are the job's output."""
    def work(spec, ctx: WorkerContext, fields: dict, lease: Lease) -> ShardMarker:
        summary = run(spec, job_id, ctx, training_reporter(task, ctx, lease))
        return commit_shard(ctx.store, spec.output, 0, {}, {**fields, **summary},
                            written=written_files(ctx.store, spec.output))

    return execute(task, job_id, 0, work)


@app.task(name=TASK_FINETUNE, queue=QUEUE_TRAIN, **TASK_OPTIONS)
def finetune(self: Task, job_id: str) -> dict:
    from workers.training.finetune import finetune as finetune_fn

    with all_cores():  # one long task: the worker's share of the host's cores would leave the rest idle
        return _single_task(self, job_id, finetune_fn)


@app.task(name=TASK_EVALUATE, **TASK_OPTIONS)
def evaluate(self: Task, job_id: str) -> dict:
    from workers.training.evaluation import evaluate as evaluate_fn

    with all_cores():
        return _single_task(self, job_id, evaluate_fn)


@app.task(name=TASK_EXPORT, **TASK_OPTIONS)
def export(self: Task, job_id: str) -> dict:
    from workers.onnx.export import export as export_fn

    return _single_task(self, job_id, export_fn)


@app.task(name=TASK_SCHEDULED_RUN, acks_late=True)
def scheduled_run(name: str, entry: dict) -> dict:
    """Beat's nightly tick: plan incrementally and submit the run (the shards follow on the bulk lane)."""
    from orchestrator.submission.schedule import ScheduleEntry, start_run
    from orchestrator.submission.submit import Client

    return start_run(Client.from_settings(context().settings), ScheduleEntry(**entry))
