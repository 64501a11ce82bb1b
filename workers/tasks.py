"""Thin Celery tasks: decode the message, call runner.run_shard, map errors to job state."""

from __future__ import annotations

import logging
import threading
import time
from functools import cache

from celery import Task

from orchestrator.config import Settings
from orchestrator.constants import TASK_RUN_SHARD
from orchestrator.finalize import finalize
from orchestrator.jobs import parse_spec
from orchestrator.errors import JobNotFound, SpecError
from orchestrator.ledger import JobState
from workers.app import app
from workers.errors import ModelLoadError
from workers.runner import WorkerContext, run_shard as run_shard_fn
from workers.writers import read_commit

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled while this shard ran; the shard stops without committing."""


@cache
def context() -> WorkerContext:
    return WorkerContext(Settings())


class Heartbeat:
    """Tells the ledger every few seconds that this worker still holds the shard (see reconcile.py)."""

    def __init__(self, ctx: WorkerContext, job_id: str, shard: int) -> None:
        self.ctx, self.job_id, self.shard = ctx, job_id, shard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vitbatch-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            try:
                self.ctx.ledger.heartbeat(self.job_id, self.shard)
            except Exception:  # Redis blip: the next beat will do; the shard goes on
                log.warning("heartbeat for job %s shard %s failed", self.job_id, self.shard, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _settle(ctx: WorkerContext, job_id: str, all_settled: bool, fingerprint: str = "") -> None:
    if all_settled:
        finalize(job_id, ctx.ledger, ctx.store, fingerprint)


def _progress(task: Task, ctx: WorkerContext, job_id: str, shard: int):
    last = {"t": 0.0, "start": time.monotonic()}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last["t"] < 1.0 and done < total:
            return
        last["t"] = now
        ctx.ledger.progress(job_id, shard, done)
        rate = done / max(now - last["start"], 1e-9)
        # Flower shows this text as the task's PROGRESS result; other fields are dropped.
        task.send_event("task-progress", result=f"shard {shard}: {done}/{total} images, {rate:.0f} img/s")
        if ctx.ledger.state(job_id) is JobState.CANCELLED:
            raise JobCancelled(job_id)

    return report


@app.task(name=TASK_RUN_SHARD, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_shard(self: Task, job_id: str, shard: int) -> dict:
    ctx = context()
    try:
        return _run_shard(self, ctx, job_id, shard)
    except (SpecError, ModelLoadError) as e:
        # Retrying cannot help: fail the whole job once, with the reason.
        log.error("job %s failed: %s", job_id, e)
        ctx.ledger.set_state(job_id, JobState.FAILED, str(e))
        return {"shard": shard, "failed": str(e)}
    except JobNotFound:
        return {"shard": shard, "skipped": "job unknown to this Redis"}
    except JobCancelled:
        return {"shard": shard, "cancelled": True}
    except Exception as e:
        # Transient (S3, Redis, OOM...): back off and go again; start_shard counts the
        # deliveries and quarantines the shard once they run out.
        log.exception("job %s shard %s failed; retrying", job_id, shard)
        ctx.ledger.note_shard_error(job_id, shard, f"{type(e).__name__}: {e}")
        raise self.retry(exc=e, countdown=min(2 ** self.request.retries, 30), max_retries=None)


def _run_shard(task: Task, ctx: WorkerContext, job_id: str, shard: int) -> dict:
    if ctx.ledger.state(job_id).terminal:
        return {"shard": shard, "skipped": "job is no longer running"}
    spec = parse_spec(ctx.ledger.spec_json(job_id))
    marker = read_commit(ctx.store, spec.output, shard)
    if marker is None:
        attempts = ctx.ledger.start_shard(job_id, shard)
        if attempts > ctx.settings.max_attempts:
            reason = f"quarantined after {attempts - 1} deliveries that did not commit"
            last = ctx.ledger.last_shard_error(job_id, shard)
            reason += f"; last error: {last}" if last else ""
            log.error("job %s shard %s %s", job_id, shard, reason)
            _settle(ctx, job_id, ctx.ledger.fail_shard(job_id, shard, reason))
            return {"shard": shard, "quarantined": True}
        with Heartbeat(ctx, job_id, shard):
            marker = run_shard_fn(spec, shard, ctx, _progress(task, ctx, job_id, shard))
    # Also reached when a commit happened but a crash lost the ack: just record it again.
    settled = ctx.ledger.commit_shard(job_id, shard, marker["rows"], marker["errors"], marker["stats"])
    _settle(ctx, job_id, settled, marker["model_fingerprint"])
    return {"shard": shard, "rows": marker["rows"], "errors": marker["errors"]}
