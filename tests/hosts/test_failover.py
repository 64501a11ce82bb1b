"""Redis Sentinel across hosts: the primary's host is cut off mid-job (its link down: its sockets go
silent, nothing is closed, as when a machine vanishes), the sentinels promote the replica, and
the workers, the reconciler and the clients follow it; the job ends with every key once."""

from __future__ import annotations

import time

import pytest

from orchestrator.ledger import JobState

pytestmark = [pytest.mark.hosts, pytest.mark.chaos]


def explain(status) -> str:
    return f"job {status.job_id} {status.state.value}: failed shards {status.failed_shards}, reason {status.reason!r}"


def follow(world, group, job_id: str, cut_at: float, timeout_s: float = 150):
    """Poll the job until it ends; (status, figures): seconds from the cut to the promotion, to the
    first progress after it, and to the job's end, and the longest time without progress."""
    promoted_at = first_progress_at = None
    last_done, last_change = world.status(job_id).done, cut_at
    longest_gap_s = 0.0
    while True:
        status = world.status(job_id)
        now = time.monotonic()
        if promoted_at is None and world.lab.call(group.promoted):
            promoted_at = now
        if status.done != last_done:
            longest_gap_s = max(longest_gap_s, now - last_change)
            last_done, last_change = status.done, now
            if promoted_at is not None and first_progress_at is None:
                first_progress_at = now
        if status.state.terminal:
            break
        if now - cut_at > timeout_s:
            raise AssertionError(f"not within {timeout_s} s of the cut: job {job_id} ends ({explain(status)}, "
                                 f"{status.done} items done, promoted: {promoted_at is not None})")
        time.sleep(0.3)
    figures = {"promoted_s": promoted_at and promoted_at - cut_at,
               "first_progress_after_promotion_s": first_progress_at and first_progress_at - cut_at,
               "ended_s": now - cut_at, "longest_without_progress_s": longest_gap_s}
    return status, figures


def test_the_primarys_host_cut_off_mid_job_the_replica_takes_over_and_every_key_is_written_once(failover_world):
    world, group = failover_world
    output = world.output("primary-cut")
    job_id = world.submit(output)
    world.wait_until(f"{job_id} is under way", lambda: world.status(job_id).done > 0)
    world.lab.cut(group.primary_host, "link")
    cut_at = time.monotonic()

    status, figures = follow(world, group, job_id, cut_at)
    print(f"\nprimary cut off: {', '.join(f'{k} {v:.1f}' for k, v in figures.items() if v is not None)}")

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert figures["promoted_s"] is not None, "the sentinels promoted the replica"
    world.exactly_once(output, job_id)
