"""Workers die or leave mid-shard; the job still writes every input row exactly once."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from chaos_stack import assert_exactly_once, explain, via

from orchestrator.constants import commit_name
from orchestrator.lifecycle.states import JobState
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos


def _wait_without_reconciler(stack, job_id: str, timeout_s: float = 180):
    """Poll only: no reconciler runs, so nothing but Celery's own redelivery can finish the job."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = stack.client.status(job_id)
        if status.state.terminal:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.state.value} after {timeout_s} s without a reconciler")
        time.sleep(0.25)


def test_a_sigkilled_pool_process_gives_its_shard_back_to_the_same_worker(stack, slow_s3, digits):
    parent = stack.workers.start("prefork", pool="prefork", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    shard = stack.running_shard(job_id)
    [child] = stack.workers.pool_children("prefork")
    psutil.Process(child).send_signal(signal.SIGKILL)
    status = _wait_without_reconciler(stack, job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert parent.poll() is None, "the worker itself survives losing its pool process"
    assert child not in stack.workers.pool_children("prefork"), "the killed pool process was replaced"
    assert stack.attempts(job_id)[shard] >= 2, "the killed shard was delivered again"
    assert status.requeued == 0, "Celery redelivered the shard; the reconciler was not needed"
    assert "WorkerLostError" in stack.workers.log("prefork")
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_sigkilled_solo_worker_is_replaced_and_the_reconciler_requeues_its_shard(stack, slow_s3, digits):
    stack.workers.start("doomed", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    shard = stack.running_shard(job_id)
    stack.workers.kill("doomed")
    stack.workers.start("successor", env=via(slow_s3), wait=False)
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.requeued >= 1, "the silent shard was re-enqueued by the reconciler"
    assert stack.attempts(job_id)[shard] >= 2
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_sigkilled_worker_with_two_shards_in_flight_loses_neither(stack, slow_s3, digits):
    stack.workers.start("doubled", pool="auto", shards_in_flight=2, env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1, shard_size=-(-len(digits.keys) // 4))
    shards = stack.running_shards(job_id, 2)
    stack.workers.kill("doubled")
    stack.workers.start("successor", env=via(slow_s3), wait=False)
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.requeued >= 2, "both silent shards were re-enqueued by the reconciler"
    assert all(stack.attempts(job_id)[shard] >= 2 for shard in shards)
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_warm_shutdown_finishes_the_running_shard_before_the_worker_leaves(stack, slow_s3, digits):
    leaving = stack.workers.start("leaving", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    shard = stack.running_shard(job_id)
    stack.workers.kill("leaving", signal.SIGTERM)
    stack.workers.start("successor", env=via(slow_s3), wait=False)
    assert leaving.wait(timeout=120) == 0, stack.workers.log("leaving")[-3000:]
    assert stack.store.exists(join(stack.folder(job_id), commit_name(shard))), "the running shard was committed"
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert stack.attempts(job_id)[shard] == 1, "the shard ran once: a warm shutdown does not abandon it"
    assert status.requeued == 0
    assert_exactly_once(stack.output, digits.keys, stack.store)
