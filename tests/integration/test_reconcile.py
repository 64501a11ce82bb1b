"""The reconciler against a real Redis: lost messages and silent shards are re-enqueued."""

from __future__ import annotations

import json

import pytest

from orchestrator.jobs import parse_spec
from orchestrator.ledger import ShardState
from orchestrator.reconcile import reconcile
from workers.demo import write_digits

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
