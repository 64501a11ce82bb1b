"""The job state machine, read as a specification: the ledger and a shard task's life, against a real
Redis (started by the session fixture) and a local output folder. No worker, no Celery broker traffic."""

from __future__ import annotations

import json
import secrets
import time

import pytest

from orchestrator import constants as k
from orchestrator.config import Settings
from orchestrator.errors import JobNotFound, OutputBusy
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.commits import JobStamp, ShardMarker, ShardWork
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.outputs import job_dir
from orchestrator.published.results import success_record
from orchestrator.store.storage import join, normalize_uri
from workers.context import WorkerContext
from workers.errors import ShardFailed
from workers.lifecycle import run_unit
from workers.writers import commit_shard

TTL_S = 3600


@pytest.fixture
def ctx(redis_server) -> WorkerContext:
    ctx = WorkerContext(Settings(broker_url=redis_server.url(), max_attempts=2, job_ttl_s=TTL_S))
    ctx.hostname = "unit@test"
    return ctx


@pytest.fixture
def job(ctx, tmp_path):
    """A recorded two-shard classify job (as submit leaves it), its id and spec."""
    job_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": str(tmp_path / "model")})
    ctx.ledger.hold_output(spec.output, job_id)
    ctx.ledger.create(job_id, spec.model_dump_json(), "classify", spec.output, n_items=4, n_shards=2)
    return job_id, spec


class Work:
    """A shard's work: commits two rows into the job's folder and counts its calls."""

    def __init__(self, shard: int | None = None, compute: str = "") -> None:
        self.calls, self.shard, self.compute = 0, shard, compute

    def __call__(self, spec, ctx, stamp: JobStamp, lease=None) -> ShardMarker:
        self.calls += 1
        shard = self.calls - 1 if self.shard is None else self.shard  # shards 0, 1, ... in call order
        rows = json.dumps([{"key": f"k{shard}"}]).encode()
        return commit_shard(ctx.store, spec.output, shard, {f"part-{shard:05d}.json": rows}, stamp,
                            ShardWork(rows=2, compute=self.compute, stats={"compute_s": 0.1}))


def test_a_first_delivery_runs_the_work_commits_and_the_last_shard_publishes_the_job(ctx, job):
    job_id, spec = job
    work = Work()
    run_unit(ctx, job_id, 0, work)
    assert ctx.ledger.state(job_id) is JobState.RUNNING
    run_unit(ctx, job_id, 1, work)

    assert work.calls == 2
    assert ctx.ledger.state(job_id) is JobState.SUCCEEDED
    record = success_record(spec.output, ctx.store)
    assert record.job_id == job_id and record.job_dir == f"_jobs/{job_id}"
    assert [p.name for p in record.parts] == [f"_jobs/{job_id}/part-00000.json", f"_jobs/{job_id}/part-00001.json"]


def test_the_record_counts_the_shards_of_each_way_they_were_computed(ctx, job):
    """`auto` precision resolves on each worker: a job whose shards ran on a GPU and on a CPU says so."""
    job_id, spec = job
    run_unit(ctx, job_id, 0, Work(0, "cuda fp16"))
    run_unit(ctx, job_id, 1, Work(1, "cpu fp32"))
    assert success_record(spec.output, ctx.store).computed_with == {"cpu fp32": 1, "cuda fp16": 1}


def test_a_redelivery_after_commit_only_records_the_marker(ctx, job):
    job_id, _ = job
    work = Work()
    run_unit(ctx, job_id, 0, work)
    run_unit(ctx, job_id, 0, work)  # the ack was lost: Redis delivers the shard again
    assert work.calls == 1
    assert ctx.ledger.r.hget(k.shard_attempts_key(job_id), "0") == "1"
    assert ctx.ledger.shard_states(job_id) == {0: ShardState.COMMITTED, 1: ShardState.PENDING}


def test_a_marker_of_another_job_in_the_folder_is_not_honoured(ctx, job):
    job_id, spec = job
    folder = job_dir(spec.output, job_id)
    commit_shard(ctx.store, folder, 0, {}, JobStamp("someone-else"), ShardWork(rows=9))
    work = Work()
    run_unit(ctx, job_id, 0, work)
    assert work.calls == 1, "a stale marker made the shard skip its work"


def test_a_shard_delivered_too_often_is_quarantined_and_the_job_finishes_with_failures(ctx, job):
    job_id, spec = job
    run_unit(ctx, job_id, 1, Work(1))
    for _ in range(ctx.settings.max_attempts):
        ctx.ledger.start_shard(job_id, 0)  # deliveries that crashed before committing
    with pytest.raises(ShardFailed, match="quarantined after 2 deliveries"):
        run_unit(ctx, job_id, 0, Work())

    assert ctx.ledger.state(job_id) is JobState.FINISHED_WITH_FAILURES
    assert not ctx.store.exists(join(spec.output, k.SUCCESS_FILE))  # a previous success would stay readable
    assert json.loads(ctx.store.read(join(spec.output, k.FAILURES_FILE)))["failed_shards"].keys() == {"0"}


def test_a_cancelled_job_skips_its_shards_frees_its_prefix_and_retry_makes_them_pending(ctx, job):
    job_id, spec = job
    lease = ctx.ledger.start_shard(job_id, 0)
    ctx.ledger.set_state(job_id, JobState.CANCELLED, "cancelled by user")
    assert run_unit(ctx, job_id, 1, Work(1))["skipped"] == "job is no longer running"
    ctx.ledger.stand_down(lease)  # what a running delivery does when it sees the cancel
    assert ctx.ledger.shard_states(job_id) == {0: ShardState.PENDING, 1: ShardState.PENDING}
    ctx.ledger.hold_output(spec.output, "another-job")  # the prefix is free again

    ctx.ledger.reset_shards(job_id, [0, 1])
    assert ctx.ledger.state(job_id) is JobState.QUEUED
    assert ctx.ledger.r.ttl(k.job_key(job_id)) == -1, "a job running again does not expire"


def test_one_live_job_holds_a_prefix_until_it_ends(ctx, job):
    job_id, spec = job
    with pytest.raises(OutputBusy, match=job_id):
        ctx.ledger.hold_output(spec.output, "second-job")
    ctx.ledger.hold_output(spec.output, job_id)  # the holder itself may take it again (retry)
    ctx.ledger.set_state(job_id, JobState.SUCCEEDED)
    ctx.ledger.hold_output(spec.output, "second-job")


def test_a_lease_whose_job_never_reached_redis_lapses_after_the_grace_period(ctx, tmp_path):
    output = normalize_uri(str(tmp_path / "o"))
    ctx.ledger.r.set(k.output_lease_key(output), f"ghost-job {time.time()}")
    with pytest.raises(OutputBusy, match="ghost-job"):
        ctx.ledger.hold_output(output, "new-job")
    ctx.ledger.r.set(k.output_lease_key(output), f"ghost-job {time.time() - 3600}")
    ctx.ledger.hold_output(output, "new-job")


def test_the_reconciler_leaves_a_shard_alone_while_it_waits_out_its_retry_backoff(ctx, job):
    job_id, _ = job
    lease = ctx.ledger.start_shard(job_id, 0)
    ctx.ledger.hold_for(lease, 30)  # a failed delivery, retrying in 30 s
    assert not ctx.ledger.requeue_if_stale(job_id, 0, stale_after_s=5)
    ctx.ledger.hold_for(lease, -10)  # as if its backoff had ended 10 s ago
    assert ctx.ledger.requeue_if_stale(job_id, 0, stale_after_s=5) == "silent"


def test_an_ended_jobs_keys_expire_and_its_status_then_says_so(ctx, job):
    job_id, _ = job
    ctx.ledger.set_state(job_id, JobState.SUCCEEDED)
    for key in (k.job_key(job_id), k.shard_state_key(job_id)):
        assert 0 < ctx.ledger.r.ttl(key) <= TTL_S
    with pytest.raises(JobNotFound, match="expired"):
        Ledger(ctx.ledger.r, job_ttl_s=TTL_S).status("20200101-000000-abcdef")
    with pytest.raises(JobNotFound, match="check the id"):
        ctx.ledger.status("no-such-job")


def test_a_waiting_client_sees_the_end_when_it_is_recorded_not_a_poll_later(ctx, job, redis_server):
    """Client.wait pauses on the job's state channel: with a poll of an hour it still returns
    as soon as another process records the end (here: another connection, cancelling)."""
    import threading

    from orchestrator.submission.submit import Client

    job_id, _ = job
    client = Client.from_settings(Settings(broker_url=redis_server.url()))
    pausing, seen = threading.Event(), []
    # on_update runs after each read: the waiter pauses next, and what is published from then on ends the pause
    waiter = threading.Thread(target=lambda: seen.append(client.wait(job_id, on_update=lambda _: pausing.set(),
                                                                     poll_s=3600)), daemon=True)
    waiter.start()
    assert pausing.wait(timeout=60)
    Ledger.from_url(redis_server.url()).set_state(job_id, JobState.CANCELLED, "cancelled by user")
    waiter.join(timeout=60)  # far below the poll: only the state channel can end the wait in time
    assert seen and seen[0].state is JobState.CANCELLED


def test_a_state_recorded_before_the_wait_starts_ends_it_at_once(ctx, job, redis_server):
    from orchestrator.submission.submit import Client

    job_id, _ = job
    ctx.ledger.set_state(job_id, JobState.CANCELLED, "cancelled by user")
    client = Client.from_settings(Settings(broker_url=redis_server.url()))
    assert client.wait(job_id, poll_s=3600).state is JobState.CANCELLED


def test_a_wait_told_to_stop_raises_keyboard_interrupt_within_a_poll(ctx, job, redis_server):
    """`vitbatch run` passes the embedded stack's SIGTERM event: a wait whose interrupt was lost
    (raised inside a finalizer) still ends."""
    import threading

    from orchestrator.submission.submit import Client

    job_id, _ = job
    client = Client.from_settings(Settings(broker_url=redis_server.url()))
    stop, pausing, raised = threading.Event(), threading.Event(), []

    def wait() -> None:
        try:
            client.wait(job_id, on_update=lambda _: pausing.set(), poll_s=0.2, stop=stop)
        except KeyboardInterrupt:
            raised.append(True)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert pausing.wait(timeout=60)
    stop.set()
    waiter.join(timeout=60)
    assert raised == [True] and not ctx.ledger.status(job_id).state.terminal  # it stopped waiting, not the job


def test_only_the_commit_that_settles_the_last_shard_says_so_in_any_order(ctx, tmp_path):
    """The settled check resumes from the shard it last found unsettled (fencing.SETTLED): out of
    order, and with a lower shard reopened after the scan passed it, only the last commit is 'all settled'."""
    job_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
    ctx.ledger.create(job_id, "{}", "classify", str(tmp_path / "out"), n_items=6, n_shards=6)

    def commit(shard: int) -> bool:
        return ctx.ledger.record_commit(ctx.ledger.start_shard(job_id, shard), 1, 0, {})

    assert [commit(shard) for shard in (3, 0, 5, 1)] == [False] * 4
    quarantined = ctx.ledger.start_shard(job_id, 2)
    assert ctx.ledger.fail_shard(quarantined, "bench") is False  # shard 4 is still pending
    ctx.ledger.reset_shards(job_id, [0])  # `retry` reopens a shard the scan has passed
    assert commit(4) is False
    assert commit(0) is True
    assert ctx.ledger.all_settled(job_id)


def test_a_commit_reads_a_few_shard_states_not_every_one(ctx, tmp_path):
    """At 10,000 shards a commit that read every state (HVALS) cost O(shards) in Redis: the job's
    commits O(shards²) (bench/control_plane.py). Counted by the server, not timed."""
    job_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
    ctx.ledger.create(job_id, "{}", "classify", str(tmp_path / "out"), n_items=1000, n_shards=1000)
    leases = [ctx.ledger.start_shard(job_id, shard) for shard in range(1, 101)]
    ctx.ledger.r.config_resetstat()
    assert not any(ctx.ledger.record_commit(lease, 1, 0, {}) for lease in leases)  # shard 0 is pending
    calls = {name: int(stat["calls"]) for name, stat in ctx.ledger.r.info("commandstats").items()}
    assert calls.get("cmdstat_hvals", 0) == 0 and calls.get("cmdstat_hgetall", 0) == 0
    assert calls["cmdstat_hget"] <= 100 * 10  # a handful a commit, whatever the job's size
