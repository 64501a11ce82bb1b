"""Progress, heartbeats and cancellation for running tasks.

Progress goes two ways: the job ledger (totals for `vitbatch status`) and, from a Celery
task, a `task-progress` event, which Flower shows as the task's PROGRESS result text.
Both ledger writes carry the delivery's lease (orchestrator/lifecycle/fencing.py): once the
shard is handed to another delivery or the job ends, the next progress report
raises StaleDelivery (JobCancelled for a cancel) and the shard stops at that batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from orchestrator.errors import StaleDelivery
from orchestrator.lifecycle.fencing import Lease
from orchestrator.lifecycle.states import JobState
from workers.context import WorkerContext
from workers.errors import JobCancelled

log = logging.getLogger(__name__)
REPORT_EVERY_S = 1.0
STOP_WAIT_S = 1.0  # how long a finished shard waits for its heartbeat thread to notice

# A progress text for monitors: a Celery task's `task-progress` event (Flower's result text); in process, nothing.
Announce = Callable[[str], None]


class Heartbeat:
    """Tells the ledger every few seconds that this worker still holds the shard (see reconcile.py)."""

    def __init__(self, ctx: WorkerContext, lease: Lease) -> None:
        self.ctx, self.lease = ctx, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vitbatch-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            try:
                self.ctx.ledger.heartbeat(self.lease)
            except StaleDelivery:  # the shard is another delivery's now: its progress report stops the work
                return
            except Exception:  # Redis blip: the next beat will do; the shard goes on
                log.warning("heartbeat for job %s shard %s failed", self.lease.job_id, self.lease.shard, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # A beat stuck on a Redis that went silent (a primary cut off mid-failover) must not hold
        # the task: the thread is a daemon, it ends once its call returns and finds the stop set.
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_S)
        if self._thread.is_alive():
            log.warning("heartbeat for job %s shard %s is still waiting on Redis; the shard goes on without it",
                        self.lease.job_id, self.lease.shard)


def fenced_progress(ctx: WorkerContext, lease: Lease, done: int) -> None:
    """Record progress under the delivery's lease; JobCancelled when the job was cancelled (the
    delivery stands down), StaleDelivery when the shard or the job is no longer this delivery's."""
    try:
        ctx.ledger.progress(lease, done)
    except StaleDelivery as e:
        if e.state == JobState.CANCELLED.value:
            raise JobCancelled(lease.job_id) from None
        raise


def _throttled(ctx: WorkerContext, lease: Lease, announce: Announce):
    """(publish(done, total, text)): at most once a second, and always for the last update."""
    last = {"t": 0.0}

    def publish(done: int, total: int, text: str) -> None:
        now = time.monotonic()
        if now - last["t"] < REPORT_EVERY_S and done < total:
            return
        last["t"] = now
        fenced_progress(ctx, lease, done)
        announce(text)

    return publish


def progress_reporter(ctx: WorkerContext, lease: Lease, announce: Announce):
    job_id, shard = lease.job_id, lease.shard
    publish = _throttled(ctx, lease, announce)
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - start, 1e-9)
        # Numbers first: Flower cuts its Result column at 400 px, and the task id already names the shard.
        publish(done, total, f"{done}/{total} images, {rate:.0f} img/s: job {job_id} shard {shard}")

    return report


def training_reporter(ctx: WorkerContext, lease: Lease, announce: Announce):
    """report(dict) for training and evaluation: step, epoch, loss, images/s, done, total."""
    job_id = lease.job_id
    publish = _throttled(ctx, lease, announce)
    known_total: dict[str, int | None] = {"n": None}

    def report(info: dict) -> None:
        total = int(info.get("total") or 0)
        if total and total != known_total["n"]:
            ctx.ledger.set_total(job_id, total)
            known_total["n"] = total
        fields = [f"{name} {info[name]:.4g}" if isinstance(info[name], float) else f"{name} {info[name]}"
                  for name in ("step", "epoch", "loss", "val_accuracy", "accuracy", "images_per_s")
                  if info.get(name) is not None]
        publish(int(info.get("done") or 0), total, ", ".join(fields))

    return report
