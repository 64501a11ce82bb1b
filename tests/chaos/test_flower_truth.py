"""Flower tells the truth about shards: a running shard shows as started with its times and its
job's progress; a quarantined shard ends in FAILURE with the reason. A real Flower process, a real
worker and this test's Redis; read through Flower's own JSON API, logged in."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request

import pytest
from chaos_stack import ROOT, explain, via
from faulty_s3 import FaultyS3

from orchestrator.constants import manifest_name
from orchestrator.processes import flower_command, flower_env, free_port
from orchestrator.ledger import JobState, ShardState
from orchestrator.storage import join

pytestmark = pytest.mark.chaos
USER, PASSWORD = "ops", "flower-test-password"


def _tasks(url: str) -> dict:
    request = urllib.request.Request(url + "/api/tasks")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not seen within {timeout_s} s")


@pytest.fixture
def flower(stack):
    port = free_port()
    env = {**stack.env, **flower_env(stack.settings.broker_url, USER, PASSWORD)}
    proc = subprocess.Popen(flower_command(port), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _tasks(url) is not None, "Flower")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_flower_shows_a_running_shard_started_and_a_quarantined_one_failed(stack, flower, s3_endpoint, digits):
    job_id = stack.submit(digits.s3_prefix, shard_size=150, read_concurrency=1)  # 150 + 10 images, no worker yet
    poisoned = join(stack.folder(job_id), manifest_name(1))
    stack.store.write(poisoned, b'{"key": "0/digit-0000.png", "uri": \n')  # every delivery of shard 1 raises
    with FaultyS3(s3_endpoint, delay_s=0.05) as slow:  # shard 0 reads for 7 s or more
        stack.workers.start("w", env=via(slow), wait=False)  # a busy solo worker answers no pings

        seen = []

        def started_while_running():
            task = _tasks(flower).get(f"{job_id}-00000")
            running = stack.client.ledger.shard_states(job_id).get(0) is ShardState.RUNNING
            seen.append((running, task))
            # Flower ranks the custom PROGRESS state (our live text) above STARTED, as Celery's
            # state precedence does; what matters is that the times are there while it runs.
            live = task and task.get("state") in ("STARTED", "PROGRESS") and task.get("started")
            return task if running and live else None

        try:
            running = _wait_for(started_while_running, "shard 0 as STARTED in Flower while it runs")
        except AssertionError as e:
            states = sorted({(x[0], (x[1] or {}).get("state")) for x in seen}, key=str)
            raise AssertionError(f"{e}; {len(seen)} polls, (running, Flower state) seen: {states}") from e
        assert running["received"] and running["started"] and running["worker"] == f"w@{running['worker'].split('@')[1]}"
        if running["state"] == "PROGRESS":
            assert "images, " in running["result"] and f": job {job_id} shard 0" in running["result"] \
                and "/150 images" in running["result"], running
        status = stack.wait(job_id)
    assert status.state is JobState.FINISHED_WITH_FAILURES, explain(status)
    failed = _wait_for(lambda: (t := _tasks(flower).get(f"{job_id}-00001")) and t.get("state") == "FAILURE" and t,
                       "shard 1 as FAILURE in Flower")
    assert "quarantined after" in failed["exception"] and "JSONDecodeError" in failed["exception"], failed
    done = _tasks(flower)[f"{job_id}-00000"]
    assert done["state"] == "SUCCESS", done
