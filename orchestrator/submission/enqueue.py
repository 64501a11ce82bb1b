"""The one enqueuer: every unit of every job reaches the broker through `send_units`.

Submit, retry, recover and the reconciler send a job's units (through `Client.enqueue`); a vector
job's shard that completes a phase sends the next phase (workers/vectortasks.py). Both send the
task the job's kind names (kinds.py), under the same retry policy, after stamping the units as
enqueued so a message lost on the way is noticed (`Ledger.lost_pending`).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from orchestrator.constants import shard_task_id
from orchestrator.jobspec.kinds import job_kind
from orchestrator.lifecycle.ledger import Ledger

# A broker connection that drops mid-send is retried a few times, briefly, before the caller hears of it.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}


def send_units(app: Celery, ledger: Ledger, job_id: str, kind: str, units: Iterable[int], queue: str) -> list[int]:
    """Stamp `units` of the job as enqueued and send one task each on `queue`; returns the units sent."""
    units, task = list(units), job_kind(kind)
    if units:
        ledger.mark_enqueued(job_id, units)
        with app.producer_or_acquire() as producer:
            for unit in units:
                # A deterministic task id per (job, unit) makes duplicates easy to spot in Flower.
                app.send_task(task.task, args=task.task_args(job_id, unit), task_id=shard_task_id(job_id, unit),
                              producer=producer, retry=True, retry_policy=RETRY_POLICY, queue=queue)
    return units
