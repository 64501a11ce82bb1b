"""At-least-once delivery's two edges: a shard delivered twice at once, and a shard that always fails."""

from __future__ import annotations

import json
import re
import time

import pytest
from chaos_stack import assert_exactly_once, explain, via

from orchestrator.constants import TASK_RUN_SHARD, commit_name, manifest_name
from orchestrator.lifecycle.states import JobState
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos


def _finished_deliveries(stack, shard: int) -> int:
    pattern = re.compile(r"Task vitbatch\.run_shard\[\S+\] succeeded in .*'shard': " + str(shard) + ",")
    return len(pattern.findall(stack.workers.logs()))


def test_one_shard_delivered_to_two_workers_at_once_is_written_once(stack, slow_s3, digits):
    for name in ("a", "b"):
        stack.workers.start(name, env=via(slow_s3), wait=False)
    for name in ("a", "b"):
        stack.workers.wait_ready(name)
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1, shard_size=len(digits.keys))  # one shard
    stack.running_shard(job_id)
    stack.client.app.send_task(TASK_RUN_SHARD, args=[job_id, 0])  # the idle worker takes it at once
    deadline = time.monotonic() + 120
    while _finished_deliveries(stack, 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
    status = stack.wait(job_id)

    assert _finished_deliveries(stack, 0) == 2, stack.workers.logs()[-3000:]
    assert stack.attempts(job_id) == {0: 2}, "both deliveries computed the shard side by side"
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.done == len(digits.keys), "counters are set per shard, not added per delivery"
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_poison_shard_is_quarantined_and_retry_reruns_only_it(stack, digits):
    job_id = stack.submit(digits.s3_prefix, shard_size=50)  # 4 shards; no worker is running yet
    poisoned = join(stack.folder(job_id), manifest_name(1))
    healthy_manifest = stack.store.read(poisoned)
    stack.store.write(poisoned, b'{"key": "0/digit-0000.png", "uri": \n')  # every delivery raises
    stack.workers.start("w")
    status = stack.wait(job_id)

    assert status.state is JobState.FINISHED_WITH_FAILURES, explain(status)
    shown = stack.cli(["status", job_id, "--json"])
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["state"] == "finished_with_failures"
    assert list(report["failed_shards"]) == ["1"]
    reason = report["failed_shards"]["1"]
    assert f"after {stack.settings.max_attempts} deliveries" in reason and "JSONDecodeError" in reason, reason
    assert stack.attempts(job_id)[1] == stack.settings.max_attempts + 1  # the last one only quarantined it
    healthy = {i: stack.store.read(join(stack.folder(job_id), commit_name(i))) for i in (0, 2, 3)}

    stack.store.write(poisoned, healthy_manifest)
    retried = stack.cli(["retry", job_id])
    assert retried.returncode == 0 and "[1]" in retried.stdout, retried.stdout + retried.stderr
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.failed_shards == {}
    assert {i: stack.store.read(join(stack.folder(job_id), commit_name(i))) for i in (0, 2, 3)} == healthy, \
        "the healthy shards were not run again"
    assert {i: n for i, n in stack.attempts(job_id).items() if i != 1} == {0: 1, 2: 1, 3: 1}
    assert_exactly_once(stack.output, digits.keys, stack.store)
