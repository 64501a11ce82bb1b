"""The Celery edge: thin tasks that run a unit's life (workers/lifecycle.py) over the Redis ledger.

A task decodes its message, builds the unit's work, and maps the lifecycle's outcome to Celery's:
acknowledged, retried with backoff, or held unacknowledged while Redis refuses writes. The life
itself (skip an ended job, honour a marker, lease and count the delivery, quarantine, fenced
work with a heartbeat, commit, settle and finalize) is the one the in-process runner runs too.
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
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.lifecycle.states import JobState
from workers.celery import app
from workers.context import WorkerContext
from workers.cores import all_cores
from workers.errors import JobCancelled, ShardFailed
from workers.lifecycle import Work, image_work, run_unit, single_work
from workers.progress import Announce

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


def redis_ledger(ctx: WorkerContext) -> Ledger:
    """A worker's ledger is Redis's (its settings' URL): what the edge alone asks of it (a probe
    write, the queue a job was sent to) is Redis's own."""
    ledger = ctx.ledger
    if not isinstance(ledger, Ledger):
        raise TypeError(f"a Celery worker records jobs in Redis, not in {type(ledger).__name__}")
    return ledger


def announcer(task: Task) -> Announce:
    """A unit's progress text as the task's `task-progress` event (Flower's result text)."""
    return lambda text: task.send_event("task-progress", result=text)


def execute(task: Task, job_id: str, shard: int, work: Work) -> dict:
    """A unit's task body: the unit's life (lifecycle.run_unit) under the task's delivery, its
    outcome mapped to Celery's (acknowledged, retried with backoff, or held while Redis refuses writes)."""
    ctx = context()
    ctx.hostname = task.request.hostname or ""
    _announce(task)
    backoff_s = min(2 ** task.request.retries, 30)
    try:
        return run_unit(ctx, job_id, shard, work, backoff_s)
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
            redis_ledger(ctx).r.set(REDIS_PROBE_KEY, ctx.hostname or "worker", ex=60)
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


TASK_OPTIONS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "throws": (ShardFailed,)}


@app.task(name=TASK_RUN_SHARD, **TASK_OPTIONS)
def run_shard(self: Task, job_id: str, shard: int) -> dict:
    return execute(self, job_id, shard, image_work(shard, announcer(self)))


def _single_task(task: Task, job_id: str, run: Callable) -> dict:
    """finetune, evaluate, export: one unit of work whose files, all of them, are the job's output."""
    return execute(task, job_id, 0, single_work(run, announcer(task)))


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
