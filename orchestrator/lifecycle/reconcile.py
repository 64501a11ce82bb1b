"""The reconciler: shards whose worker went silent or stalled are put back on the queue.

A worker heartbeats every few seconds while it holds a shard. With the solo pool a
SIGKILLed worker's message only comes back after Redis's visibility timeout (an
hour by default); the reconciler notices the silence within `stale_after_s` and
re-enqueues the shard. A shard that heartbeats but has not advanced for `stall_after_s`
(a hung read, a wedged device) is handed on the same way. Either way the holder's lease
moves on (fencing.py), so if it comes back it writes nothing; running a shard twice is
safe anyway: output keys are deterministic and a commit marker makes the second run a no-op.

One job the reconciler cannot handle (a missing commit marker, a corrupt record) is logged,
counted (`vitbatch_reconcile_errors_total`) and passed over; after `max_errors` passes in a
row that fail, the job is marked failed with the reason, which frees its output prefix.
Redis being unreachable or full (maxmemory) is not the job's fault: the whole pass gives up,
writing nothing more, and its caller rides it out (redisretry.py). A job Redis no longer holds
(emptied, or replaced by a new instance) is listed as unknown and left alone: no pass writes
into it, so it never reappears as a fragment (`vitbatch recover` rebuilds it from storage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from orchestrator.errors import JobNotFound
from orchestrator.fleet.redisretry import RIDDEN_OUT  # the whole pass fails: callers ride it out
from orchestrator.jobspec.kinds import job_kind
from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.states import JobState, ShardState

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    requeued: dict[str, list[int]] = field(default_factory=dict)
    finalized: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # job -> what its pass raised
    failed: list[str] = field(default_factory=list)  # jobs marked failed after too many such passes
    unknown: list[str] = field(default_factory=list)  # jobs Redis no longer holds (left alone)


def reconcile(client, stale_after_s: float, job_ids: list[str] | None = None) -> Reconciled:
    """One pass over active jobs; safe to run from several places at once. A job whose pass
    raises does not stop the others; Redis being unreachable or full does (the caller rides it out)."""
    result = Reconciled()
    for job_id in job_ids if job_ids is not None else client.ledger.active_jobs():
        try:
            _reconcile_job(client, job_id, stale_after_s, result)
            client.ledger.clear_reconcile_errors(job_id)
        except RIDDEN_OUT:
            raise
        except JobNotFound:
            result.unknown.append(job_id)
        except Exception as e:
            _count_error(client, job_id, e, result)
    return result


def _reconcile_job(client, job_id: str, stale_after_s: float, result: Reconciled) -> None:
    ledger = client.ledger
    status = ledger.status(job_id)
    if status.state.terminal:
        return
    # one long unit (a training) reports progress sparsely: only its silence hands it on, never a stall
    stall_after_s = 0.0 if job_kind(status.kind).slow_unit else client.settings.stall_after_s
    states = ledger.shard_states(job_id)
    why = {i: ledger.requeue_if_stale(job_id, i, stale_after_s, stall_after_s)  # ages by Redis's clock
           for i, s in states.items() if s is ShardState.RUNNING}
    sent_before = ledger.now() - stale_after_s
    stale = sorted({i for i, w in why.items() if w} | set(ledger.lost_pending(job_id, sent_before)))
    if stale:
        stalled = sorted(i for i, w in why.items() if w == "stalled")
        log.warning("job %s: shards %s went silent for %.0f s%s; re-enqueueing", job_id, stale, stale_after_s,
                    f" (shards {stalled} heartbeat but did not advance)" if stalled else "")
        client.enqueue(job_id, stale)
        ledger.count_requeues(job_id, len(stale))
        result.requeued[job_id] = stale
    elif states and ledger.all_settled(job_id):
        if finalize(job_id, ledger, client.store).terminal:  # the last worker died before finalizing
            result.finalized.append(job_id)


def _count_error(client, job_id: str, error: Exception, result: Reconciled) -> None:
    """Count the failed pass, and fail the job after too many. Its writes are the guarded ones
    (a job Redis lost is not recreated); one that Redis refuses (down, full) ends the whole pass."""
    reason = f"{type(error).__name__}: {error}"
    try:
        passes = client.ledger.count_reconcile_error(job_id)
    except JobNotFound:
        result.unknown.append(job_id)
        return
    except RIDDEN_OUT as refused:
        log.error("reconciling job %s failed (%s) and Redis refused to count it (%s)", job_id, reason, refused)
        raise
    log.error("reconciling job %s failed (%d in a row): %s", job_id, passes, reason, exc_info=error)
    result.errors[job_id] = reason
    if passes >= client.settings.reconcile_max_errors:
        why = f"the reconciler could not close the job ({passes} passes failed): {reason}"
        if client.ledger.set_state(job_id, JobState.FAILED, why):
            log.error("job %s marked failed: %s", job_id, why)
            result.failed.append(job_id)
