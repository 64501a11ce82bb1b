"""The reconciler against a real Redis: lost messages and silent shards are re-enqueued."""

from __future__ import annotations

import json

import pytest

from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.reconcile import reconcile
from orchestrator.lifecycle.states import ShardState
from orchestrator.stack.demo import write_digits

pytestmark = pytest.mark.integration


@pytest.fixture
def queued_job(client, tiny_model, tmp_path):
    write_digits(tmp_path / "in", limit=12)
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": str(tiny_model), "shard_size": 4, "lane": "bulk"})
    job_id, _ = client.submit(spec)
    queue = client.ledger.queue(job_id)
    messages = [json.loads(m) for m in client.ledger.r.lrange(queue, 0, -1)]
    mine = [m for m in messages if m["headers"]["id"].startswith(job_id)]
    assert len(mine) == 3
    yield job_id, queue
    client.ledger.r.delete(queue)  # no worker runs in this module; leave nothing queued behind


def test_a_pending_shard_whose_message_was_lost_is_re_enqueued(client, queued_job):
    job_id, queue = queued_job
    client.ledger.r.delete(queue)  # the message vanished between the queue and kombu's unacked set
    assert reconcile(client, stale_after_s=3600, job_ids=[job_id]).requeued == {}  # not stale yet
    result = reconcile(client, stale_after_s=0, job_ids=[job_id])
    assert result.requeued == {job_id: [0, 1, 2]}
    assert client.ledger.r.llen(queue) == 3
    assert client.status(job_id).requeued == 3


def test_a_pending_shard_behind_other_messages_is_left_alone(client, queued_job):
    job_id, _ = queued_job
    assert reconcile(client, stale_after_s=0, job_ids=[job_id]).requeued == {}


def test_a_running_shard_that_stopped_heartbeating_goes_back_to_pending_and_the_queue(client, queued_job):
    job_id, queue = queued_job
    client.ledger.r.delete(queue)
    client.ledger.start_shard(job_id, 1)  # a worker took shard 1 and then died silently
    client.ledger.mark_enqueued(job_id, [0, 2])  # the other two were just sent again: not lost
    client.ledger.r.rpush(queue, "placeholder")  # ...and are still queued
    result = reconcile(client, stale_after_s=0, job_ids=[job_id])
    assert result.requeued == {job_id: [1]}
    assert client.ledger.shard_states(job_id)[1] is ShardState.PENDING


def test_a_job_the_reconciler_finalizes_records_the_model_its_shards_ran(client, queued_job, settings):
    """The reconciler and the last worker race to finalize; either way the record names the model
    (it once came only from the last worker's call, so a reconciler's record had an empty one)."""
    from orchestrator.constants import SUCCESS_FILE
    from orchestrator.lifecycle.commits import JobStamp
    from orchestrator.published.outputs import job_dir, spec_digest
    from orchestrator.published.results import read_json
    from orchestrator.store.storage import join
    from workers.context import WorkerContext
    from workers.runner import run_shard

    job_id, queue = queued_job
    client.ledger.r.delete(queue)  # no worker: this test plays the worker's part in-process
    ctx = WorkerContext(settings)
    spec_json = client.ledger.spec_json(job_id)
    spec = parse_spec(spec_json)
    local = spec.model_copy(update={"output": job_dir(spec.output, job_id)})
    stamp = JobStamp(job_id, spec_digest(spec_json))
    fingerprints = set()
    for shard in range(3):
        lease = client.ledger.start_shard(job_id, shard)
        marker = run_shard(local, shard, ctx, job_id=job_id, stamp=stamp)
        fingerprints.add(marker.model_fingerprint)
        client.ledger.record_commit(lease, marker.rows, marker.errors, marker.stats)
    # ...and the worker died before finalizing: the reconciler closes the job.
    assert reconcile(client, stale_after_s=3600, job_ids=[job_id]).finalized == [job_id]
    record = read_json(client.store, join(spec.output, SUCCESS_FILE))
    assert record["job_id"] == job_id and len(fingerprints) == 1
    assert record["model_fingerprint"] == fingerprints.pop() and record["model_fingerprint"].startswith("sha256:")


def _reconcile_with_shard_1_taken(client, queued_job, taken_s_ago: float) -> dict:
    """Every shard sent two minutes ago and gone from the queue; shard 1's message moved into
    kombu's unacked set `taken_s_ago`, as a worker's take does; one reconciler pass (stale 60 s)."""
    import time

    job_id, queue = queued_job
    client.ledger.r.hset(f"vitbatch:job:{job_id}:enqueued", mapping={str(i): time.time() - 120 for i in range(3)})
    messages = [json.loads(m) for m in client.ledger.r.lrange(queue, 0, -1)]
    message = next(m for m in messages if m["headers"]["id"].endswith("-00001"))
    tag = f"tag-{message['headers']['id']}"
    client.ledger.r.hset("unacked", tag, json.dumps([message, "vitbatch", "vitbatch"]))
    client.ledger.r.zadd("unacked_index", {tag: time.time() - taken_s_ago})
    client.ledger.r.delete(queue)
    try:
        return reconcile(client, stale_after_s=60, job_ids=[job_id]).requeued
    finally:
        client.ledger.r.hdel("unacked", tag)
        client.ledger.r.zrem("unacked_index", tag)


def test_a_pending_shard_a_worker_has_just_taken_is_left_to_it(client, queued_job):
    """Between taking a message (kombu moves it into its unacked set) and marking the shard
    running, a worker reads the job and creates its clients: seconds on a slow S3. A reconciler
    pass then sees the shard pending and its queue empty: the message is not lost, a worker holds it."""
    job_id, _ = queued_job
    assert _reconcile_with_shard_1_taken(client, queued_job, taken_s_ago=30) == {job_id: [0, 2]}


def test_a_shard_taken_by_a_worker_that_died_before_starting_it_is_re_enqueued(client, queued_job):
    job_id, _ = queued_job
    assert _reconcile_with_shard_1_taken(client, queued_job, taken_s_ago=90) == {job_id: [0, 1, 2]}
