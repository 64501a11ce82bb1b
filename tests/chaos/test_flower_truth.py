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

from orchestrator.constants import manifest_name
from orchestrator.processes import flower_command, flower_env, free_port
from orchestrator.ledger import JobState
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


def test_flower_shows_a_running_shard_started_and_a_quarantined_one_failed(stack, flower, slow_s3, digits):
    job_id = stack.submit(digits.s3_prefix, shard_size=100, read_concurrency=1)  # 2 shards, no worker yet
    poisoned = join(stack.folder(job_id), manifest_name(1))
    stack.store.write(poisoned, b'{"key": "0/digit-0000.png", "uri": \n')  # every delivery of shard 1 raises
    stack.workers.start("w", env=via(slow_s3))
    stack.running_shard(job_id)

    running = _wait_for(lambda: (t := _tasks(flower).get(f"{job_id}-00000")) and t.get("state") == "STARTED" and t,
                        "shard 0 as STARTED in Flower")
    assert running["received"] and running["started"], running
    assert stack.client.ledger.state(job_id) is JobState.RUNNING

    status = stack.wait(job_id)
    assert status.state is JobState.FINISHED_WITH_FAILURES, explain(status)
    failed = _wait_for(lambda: (t := _tasks(flower).get(f"{job_id}-00001")) and t.get("state") == "FAILURE" and t,
                       "shard 1 as FAILURE in Flower")
    assert "quarantined after" in failed["exception"] and "JSONDecodeError" in failed["exception"], failed
    done = _tasks(flower)[f"{job_id}-00000"]
    assert done["state"] == "SUCCESS", done
