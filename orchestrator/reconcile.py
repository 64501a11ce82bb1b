"""The reconciler: shards whose worker went silent are put back on the queue.

A worker heartbeats every few seconds while it holds a shard. With the solo pool a
SIGKILLed worker's message only comes back after Redis's visibility timeout (an
hour by default); the reconciler notices the silence within `stale_after_s` and
re-enqueues the shard. Running a shard twice is safe: output keys are deterministic
and a commit marker makes the second run a no-op.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from orchestrator.finalize import finalize
from orchestrator.ledger import ShardState

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    requeued: dict[str, list[int]] = field(default_factory=dict)
    finalized: list[str] = field(default_factory=list)


def reconcile(client, stale_after_s: float, job_ids: list[str] | None = None) -> Reconciled:
    """One pass over active jobs; safe to run from several places at once."""
    result = Reconciled()
    now = time.time()
    for job_id in job_ids if job_ids is not None else client.ledger.active_jobs():
        states = client.ledger.shard_states(job_id)
        stale = [i for i, s in states.items() if s is ShardState.RUNNING
                 and client.ledger.requeue_if_stale(job_id, i, now - stale_after_s)]
        stale = sorted(set(stale + client.ledger.lost_pending(job_id, now - stale_after_s)))
        if stale:
            log.warning("job %s: shards %s went silent for %.0f s; re-enqueueing", job_id, stale, stale_after_s)
            client.enqueue(job_id, stale)
            client.ledger.count_requeues(job_id, len(stale))
            result.requeued[job_id] = stale
        elif states and client.ledger.all_settled(job_id) and not client.ledger.state(job_id).terminal:
            finalize(job_id, client.ledger, client.store)  # the last worker died before finalizing
            result.finalized.append(job_id)
    return result
