"""A unit's one life (workers/lifecycle.run_unit) over the in-memory ledger, server-free: what the
integration tier's test_ledger.py checks over Redis, the same function with the other JobLedger."""

from __future__ import annotations

import json
import secrets
import time

import pytest

from orchestrator import constants as k
from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.commits import JobStamp, ShardMarker, ShardWork
from orchestrator.lifecycle.memoryledger import MemoryLedger
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.store.storage import join
from workers.context import WorkerContext
from workers.errors import ShardFailed
from workers.lifecycle import run_unit
from workers.writers import commit_shard


@pytest.fixture
def ctx() -> WorkerContext:
    return WorkerContext(Settings(max_attempts=2)).over(MemoryLedger())


@pytest.fixture
def job(ctx, tmp_path):
    """A recorded two-shard classify job (as submit, or the in-process runner, leaves it)."""
    job_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": str(tmp_path / "model")})
    ctx.ledger.hold_output(spec.output, job_id)
    ctx.ledger.create(job_id, spec.model_dump_json(), "classify", spec.output, n_items=4, n_shards=2)
    return job_id, spec


class Work:
    """A shard's work: commits two rows into the job's folder and counts its calls; or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls, self.error = 0, error

    def __call__(self, spec, ctx, stamp: JobStamp, lease) -> ShardMarker:
        self.calls += 1
        if self.error is not None:
            raise self.error
        rows = json.dumps([{"key": f"k{lease.shard}"}]).encode()
        return commit_shard(ctx.store, spec.output, lease.shard, {f"part-{lease.shard:05d}.json": rows}, stamp,
                            ShardWork(rows=2, stats={"compute_s": 0.1}))


def record(ctx, spec, name: str = k.SUCCESS_FILE) -> dict:
    return json.loads(ctx.store.read(join(spec.output, name)))


def test_the_last_unit_to_commit_publishes_the_job_under_its_claim(ctx, job):
    job_id, spec = job
    work = Work()
    assert run_unit(ctx, job_id, 1, work) == {"shard": 1, "rows": 2, "errors": 0}
    assert ctx.ledger.state(job_id) is JobState.RUNNING
    run_unit(ctx, job_id, 0, work)
    assert ctx.ledger.state(job_id) is JobState.SUCCEEDED
    published = record(ctx, spec)
    assert published["job_id"] == job_id and (published["items"], published["processed"]) == (4, 4)
    assert [p["name"] for p in published["parts"]] == [f"_jobs/{job_id}/part-00000.json", f"_jobs/{job_id}/part-00001.json"]


def test_a_redelivery_after_commit_only_records_the_marker(ctx, job):
    job_id, _ = job
    work = Work()
    run_unit(ctx, job_id, 0, work)
    run_unit(ctx, job_id, 0, work)  # the ack was lost: the unit is delivered again
    assert work.calls == 1
    assert ctx.ledger.shard_states(job_id) == {0: ShardState.COMMITTED, 1: ShardState.PENDING}


def test_a_unit_delivered_too_often_is_quarantined_and_the_job_finishes_with_failures(ctx, job):
    job_id, spec = job
    run_unit(ctx, job_id, 1, Work())
    for _ in range(ctx.settings.max_attempts):
        with pytest.raises(OSError):
            run_unit(ctx, job_id, 0, Work(OSError("the store went away")))
    with pytest.raises(ShardFailed, match="quarantined after 2 deliveries.*OSError: the store went away"):
        run_unit(ctx, job_id, 0, Work())
    assert ctx.ledger.state(job_id) is JobState.FINISHED_WITH_FAILURES
    assert record(ctx, spec, k.FAILURES_FILE)["failed_shards"].keys() == {"0"}


def test_a_transient_error_is_noted_and_the_unit_held_through_its_backoff(ctx, job):
    job_id, _ = job
    with pytest.raises(OSError):
        run_unit(ctx, job_id, 0, Work(OSError("slow down")), backoff_s=30)
    assert ctx.ledger.last_shard_error(job_id, 0) == "OSError: slow down"
    assert ctx.ledger.heartbeats(job_id)[0] > ctx.ledger.now() + 20


def test_a_not_retryable_error_fails_the_job_once_and_later_units_skip(ctx, job):
    job_id, spec = job
    with pytest.raises(ShardFailed, match="no such layer") as failed:
        run_unit(ctx, job_id, 0, Work(SpecError("no such layer")))
    assert isinstance(failed.value.__cause__, SpecError)  # what the in-process runner raises
    assert ctx.ledger.status(job_id).state is JobState.FAILED and ctx.ledger.status(job_id).reason == "no such layer"
    assert run_unit(ctx, job_id, 1, Work())["skipped"] == "job is no longer running"
    assert not ctx.store.exists(join(spec.output, k.SUCCESS_FILE))
