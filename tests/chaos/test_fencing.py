"""Fencing: a delivery that was handed on, or whose job ended, writes nothing more; a job is
published once; the reconciler and waiting clients outlive one bad job and a Redis restart.

Each test has its own Redis (the chaos `stack`) and plays the workers' part in this process
through the real task life (`workers.lifecycle.run_unit`), so that a partition can be opened and
healed at a chosen point: a "partitioned" delivery starts its shard, then hangs until healed.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from orchestrator.constants import SUCCESS_FILE, commit_name
from orchestrator.errors import StaleDelivery, StorageError
from orchestrator.fleet.fleetmetrics import FleetCollector
from orchestrator.lifecycle.commits import JobStamp, ShardMarker, ShardWork
from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.reconcile import reconcile
from orchestrator.lifecycle.states import JobState
from orchestrator.published.results import success_record
from orchestrator.store.storage import join
from workers.context import WorkerContext
from workers.lifecycle import run_unit
from workers.writers import commit_shard

pytestmark = pytest.mark.chaos
ROWS = {0: 100, 1: 60}  # the digits job: 160 images in shards of 100


def commit(ctx, spec, stamp: JobStamp, shard: int) -> ShardMarker:
    """What a shard's work leaves behind: one part and the marker naming it."""
    part = json.dumps([{"key": f"k{shard}-{i}"} for i in range(ROWS[shard])]).encode()
    return commit_shard(ctx.store, spec.output, shard, {f"part-{shard:05d}.json": part}, stamp,
                        ShardWork(rows=ROWS[shard], stats={"compute_s": 0.1}))


class Work:
    """A delivery's work that goes through at once; keeps the lease it ran under."""

    def __init__(self, shard: int) -> None:
        self.shard, self.lease = shard, None

    def __call__(self, spec, ctx, stamp: JobStamp, lease=None) -> ShardMarker:
        self.lease = lease
        return commit(ctx, spec, stamp, self.shard)


class Partitioned:
    """A delivery cut off after it started its shard: its work hangs until `heal()`, then reports
    progress (what it would do at its next batch) and finishes the shard as if nothing happened."""

    def __init__(self, ctx: WorkerContext, job_id: str, shard: int) -> None:
        self.ctx, self.job_id, self.shard = ctx, job_id, shard
        self.started, self.healed = threading.Event(), threading.Event()
        self.progress_error: BaseException | None = None
        self.outcome: BaseException | dict | None = None
        self.thread = threading.Thread(target=self._deliver, daemon=True)

    def _work(self, spec, ctx, stamp: JobStamp, lease=None) -> ShardMarker:
        self.started.set()
        self.healed.wait(60)
        try:
            ctx.ledger.progress(lease, ROWS[self.shard] // 2)
        except Exception as e:
            self.progress_error = e
        return commit(ctx, spec, stamp, self.shard)

    def _deliver(self) -> None:
        try:
            self.outcome = run_unit(self.ctx, self.job_id, self.shard, self._work)
        except BaseException as e:
            self.outcome = e

    def start(self) -> Partitioned:
        self.thread.start()
        assert self.started.wait(60), f"the delivery never started: {self.outcome!r}"
        return self

    def heal(self) -> None:
        self.healed.set()
        self.thread.join(60)


@pytest.fixture
def ctx(stack) -> WorkerContext:
    ctx = WorkerContext(stack.settings)
    ctx.hostname = "in-process@test"
    return ctx


def hand_on(stack, job_id: str) -> None:
    """The reconciler sees the partitioned delivery silent and re-enqueues its shard."""
    assert reconcile(stack.client, stale_after_s=0, job_ids=[job_id]).requeued.get(job_id)


def run_all(ctx, job_id: str, shards=(0, 1)) -> None:
    for shard in shards:
        run_unit(ctx, job_id, shard, Work(shard))


def test_a_delivery_handed_on_cannot_progress_commit_or_republish_once_it_heals(stack, ctx, digits):
    job_id = stack.submit(digits.s3_prefix)
    stale = Partitioned(ctx, job_id, 0).start()
    hand_on(stack, job_id)
    run_all(ctx, job_id)  # the new delivery of shard 0, then shard 1: the job succeeds
    assert stack.client.status(job_id).state is JobState.SUCCEEDED
    published = stack.store.read(join(stack.output, SUCCESS_FILE))

    stale.heal()
    assert isinstance(stale.outcome, StaleDelivery), f"the stale delivery committed: {stale.outcome!r}"
    assert stack.store.read(join(stack.output, SUCCESS_FILE)) == published, "a stale delivery republished the job"
    assert isinstance(stale.progress_error, StaleDelivery), stale.progress_error
    status = stack.client.status(job_id)
    assert status.state is JobState.SUCCEEDED and status.done == sum(ROWS.values())


def test_an_ended_jobs_finalize_is_refused_and_its_record_stays_byte_identical(stack, ctx, digits):
    job_id = stack.submit(digits.s3_prefix)
    run_all(ctx, job_id)
    published = stack.store.read(join(stack.output, SUCCESS_FILE))

    assert finalize(job_id, stack.client.ledger, stack.store) is JobState.SUCCEEDED
    assert stack.store.read(join(stack.output, SUCCESS_FILE)) == published


def test_a_stale_finalize_of_a_replaced_job_leaves_the_overwrite_running_and_it_succeeds(stack, ctx, digits):
    """The issue's story: a worker back from a partition finishes job A's stale shard after A
    ended and B took A's prefix with --overwrite; B's folder stays, and B then succeeds."""
    job_a = stack.submit(digits.s3_prefix)
    stale = Partitioned(ctx, job_a, 1).start()
    hand_on(stack, job_a)
    run_all(ctx, job_a)
    job_b, _ = stack.client.submit(stack.spec(digits.s3_prefix), overwrite=True)
    run_all(ctx, job_b, shards=[0])  # B is running: shard 0 committed, shard 1 not yet

    stale.heal()
    assert isinstance(stale.outcome, StaleDelivery), f"the stale delivery committed: {stale.outcome!r}"
    assert stack.store.exists(join(stack.folder(job_b), commit_name(0))), "B's folder was removed under it"
    assert success_record(stack.output, stack.store).job_id == job_a

    run_all(ctx, job_b, shards=[1])
    assert stack.client.status(job_b).state is JobState.SUCCEEDED
    assert success_record(stack.output, stack.store).job_id == job_b
    assert not stack.store.exists(join(stack.folder(job_a), commit_name(0))), "B's success removes A's folder"


def test_the_reconciler_passes_over_a_job_whose_marker_is_missing_recovers_another_then_fails_it(
        stack, ctx, digits):
    wedged = stack.submit(digits.s3_prefix)
    run_unit(ctx, wedged, 0, Work(0))
    stack.store.delete(join(stack.folder(wedged), commit_name(0)))  # the marker the ledger counts on is gone
    with pytest.raises(StorageError, match="is missing"):
        run_unit(ctx, wedged, 1, Work(1))  # the last shard's finalize cannot read it
    other = stack.submit(digits.s3_prefix, output=stack.output + "other/")
    stack.client.ledger.start_shard(other, 0)  # a worker took shard 0 and died silently

    result = reconcile(stack.client, stale_after_s=0, job_ids=[wedged, other])
    assert result.requeued == {other: [0]}
    for _ in range(stack.settings.reconcile_max_errors - 1):
        reconcile(stack.client, stale_after_s=0, job_ids=[wedged])

    status = stack.client.status(wedged)
    assert status.state is JobState.FAILED and "is missing" in status.reason, status.reason
    stack.client.ledger.hold_output(stack.output, "the-next-job")  # its prefix is free again
    samples = {s.name: s.value for family in FleetCollector(stack.client.ledger).collect() for s in family.samples}
    assert samples["vitbatch_reconcile_errors_total"] == stack.settings.reconcile_max_errors


def test_a_wait_rides_out_a_redis_restart_and_returns_the_jobs_real_end(stack, ctx, digits):
    job_id = stack.submit(digits.s3_prefix)
    watching, seen = threading.Event(), []

    def wait() -> None:
        try:
            seen.append(stack.client.wait(job_id, on_update=lambda _: watching.set(), poll_s=0.25))
        except BaseException as e:
            seen.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert watching.wait(60)
    stack.redis.kill()
    time.sleep(3)  # the waiter's reads and its subscription fail meanwhile
    stack.redis.start()
    run_all(ctx, job_id)
    waiter.join(60)

    assert seen and not isinstance(seen[0], BaseException), f"the wait ended with {seen[0]!r}"
    assert seen[0].state is JobState.SUCCEEDED and seen[0].done == sum(ROWS.values())


def test_late_progress_cannot_lower_the_done_count(stack, ctx, digits):
    job_id = stack.submit(digits.s3_prefix)
    work = Work(0)
    run_unit(ctx, job_id, 0, work)
    done = stack.client.status(job_id).done
    with pytest.raises(StaleDelivery):
        stack.client.ledger.progress(work.lease, 10)  # a write delayed past the shard's commit
    assert stack.client.status(job_id).done == done == ROWS[0]

    lease = stack.client.ledger.start_shard(job_id, 1)
    stack.client.ledger.progress(lease, 50)
    stack.client.ledger.progress(lease, 20)  # reports arriving out of order
    assert stack.client.status(job_id).done == ROWS[0] + 50


def test_a_shard_that_heartbeats_but_does_not_advance_is_handed_on_and_its_holder_fenced(stack, ctx, digits):
    job_id = stack.submit(digits.s3_prefix)
    stuck = Partitioned(ctx, job_id, 0).start()  # alive (its heartbeat thread runs) but not advancing
    client = dataclasses.replace(stack.client, settings=stack.settings.model_copy(update={"stall_after_s": 0.01}))
    time.sleep(0.1)  # longer than the stall limit above

    assert reconcile(client, stale_after_s=3600, job_ids=[job_id]).requeued == {job_id: [0]}
    run_all(ctx, job_id)
    stuck.heal()
    assert isinstance(stuck.outcome, StaleDelivery), f"the stuck delivery committed: {stuck.outcome!r}"
    assert stack.client.status(job_id).state is JobState.SUCCEEDED
