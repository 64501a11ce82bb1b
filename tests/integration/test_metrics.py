"""Fleet observability against real processes: a worker's Prometheus endpoint after a job, the
fleet exporter (`vitbatch metrics`) following the queues, and Flower's /metrics behind its auth."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT

from orchestrator.config import Settings
from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE, QUEUE_TRAIN
from orchestrator.fleet.fleetmetrics import queue_keys
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.stack.demo import write_digits
from orchestrator.stack.embedded import EmbeddedStack
from orchestrator.stack.processes import free_port, settings_env
from orchestrator.submission.submit import Client

pytestmark = pytest.mark.integration


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _wait_for(predicate, what: str, timeout_s: float = 120):
    """Poll until predicate() returns something truthy (a wait loop with a generous deadline)."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last_error = e
        time.sleep(0.3)
    raise AssertionError(f"{what} not reached within {timeout_s} s (last error: {last_error})")


def scrape(url: str) -> list[tuple[str, dict, float]]:
    status, body = _get(url)
    assert status == 200, status
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(body) for s in family.samples]


def value(samples, name: str, **labels) -> float | None:
    """The sum of the samples named `name` whose labels include `labels`; None when there is none."""
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return sum(found) if found else None


def _images(tmp_path, n: int, bad: int = 0):
    folder = tmp_path / "images"
    write_digits(folder, limit=n)
    for i in range(bad):
        (folder / f"not-an-image-{i}.png").write_bytes(b"<html>this is not a png</html>")
    return folder


def test_a_worker_serves_the_jobs_images_and_stage_seconds_after_it_ran_them(tiny_model, tmp_path):
    images = _images(tmp_path, 20, bad=1)
    settings = Settings(metrics_port=free_port())
    with EmbeddedStack(workers=1, settings=settings, data_dir=tmp_path / "stack") as stack:
        (url,) = stack.metrics_urls
        before = _wait_for(lambda: scrape(url), "the worker's metrics endpoint")
        assert value(before, "vitbatch_images_total", kind="classify") == 0
        client = Client.from_settings(stack.settings)
        spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / "out"),
                           "model": str(tiny_model), "shard_size": 8, "batch_size": 4})
        job_id, summary = client.submit(spec)
        status = client.wait(job_id, timeout_s=300)
        assert status.state.value == "succeeded", status
        samples = scrape(url)  # recorded before the task commits to the ledger, so already here

    assert status.done == 21 and status.errors == 1
    assert value(samples, "vitbatch_images_total", kind="classify", outcome="ok") == 20
    assert value(samples, "vitbatch_images_total", kind="classify", outcome="error") == 1
    for stage in ("read", "decode", "compute", "write"):
        assert value(samples, "vitbatch_stage_seconds_total", kind="classify", stage=stage) > 0, stage
    assert value(samples, "vitbatch_stage_seconds_total", kind="classify", stage="device_decode") == 0  # CPU
    assert value(samples, "vitbatch_shard_duration_seconds_count", kind="classify") == summary["shards"] == 3
    assert value(samples, "vitbatch_shards_total", kind="classify", outcome="committed") == 3
    assert value(samples, "vitbatch_shards_in_flight") == 0
    assert value(samples, "vitbatch_model_load_seconds_count") == 1  # one load, then cache hits
    assert value(samples, "vitbatch_batch_size", kind="classify") == 4
    (worker,) = [labels["worker"] for name, labels, _ in samples if name == "vitbatch_worker_info"]
    assert worker.startswith("vitbatch-embedded-0@")
    assert not any("job" in labels for _, labels, _ in samples), "a job label on a worker metric"


def test_the_fleet_exporter_follows_the_queues_as_jobs_wait_and_a_worker_drains_them(tiny_model, tmp_path):
    import redis

    images = _images(tmp_path, 12)
    with EmbeddedStack(workers=0, data_dir=tmp_path / "stack") as stack:
        port = free_port()
        env = {**settings_env(stack.settings), "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / "exporter.log", "wb")
        exporter = subprocess.Popen([sys.executable, "-m", "orchestrator.commands.cli", "metrics", "--port", str(port),
                                     "--address", "127.0.0.1"], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            samples = _wait_for(lambda: scrape(url), "the exporter")
            assert value(samples, "vitbatch_up") == 1
            for queue in (QUEUE_INTERACTIVE, QUEUE_DEFAULT, QUEUE_TRAIN):
                assert value(samples, "vitbatch_queue_length", queue=queue) == 0, queue

            # A message sent with a priority sits in kombu's sub-list; it counts for its lane.
            broker = redis.Redis.from_url(stack.settings.broker_url)
            broker.lpush(queue_keys(QUEUE_INTERACTIVE)[1], b"{}")
            _wait_for(lambda: value(scrape(url), "vitbatch_queue_length", queue=QUEUE_INTERACTIVE) == 1,
                      "a priority sub-queue counted")
            broker.delete(queue_keys(QUEUE_INTERACTIVE)[1])

            client = Client.from_settings(stack.settings)
            jobs = []
            for n, expected in ((1, 3), (2, 6)):  # 12 images in shards of 4: 3 shards a job, bulk lane
                spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / f"out{n}"),
                                   "model": str(tiny_model), "shard_size": 4, "batch_size": 4, "lane": "bulk"})
                jobs.append(client.submit(spec)[0])
                samples = _wait_for(
                    lambda expected=expected: (lambda s: s if value(s, "vitbatch_queue_length", queue=QUEUE_DEFAULT)
                                               == expected else None)(scrape(url)),
                    f"{expected} queued shards")
            assert value(samples, "vitbatch_jobs", state="queued") == 2
            assert value(samples, "vitbatch_job_items_total", job=jobs[0], kind="classify") == 12
            assert value(samples, "vitbatch_job_items_done", job=jobs[0]) == 0
            assert value(samples, "vitbatch_job_eta_seconds", job=jobs[0]) is None  # no rate yet

            shown = subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", "status", jobs[0]], env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=120)
            assert shown.returncode == 0, shown.stderr
            assert "0.0 img/s, ETA ?" in shown.stdout, shown.stdout

            stack.start_worker("drainer")
            seen = []

            def drained():
                s = scrape(url)
                seen.append(value(s, "vitbatch_queue_length", queue=QUEUE_DEFAULT))
                return s if seen[-1] == 0 and value(s, "vitbatch_jobs", state="succeeded") == 2 else None

            samples = _wait_for(drained, "the worker draining both jobs", timeout_s=300)
            assert max(seen) <= 6 and seen[-1] == 0
            assert value(samples, "vitbatch_jobs", state="queued") == 0
            assert value(samples, "vitbatch_jobs", state="running") == 0
            assert value(samples, "vitbatch_job_items_done") is None, "an ended job's series must go"
            assert [client.status(j).state.value for j in jobs] == ["succeeded", "succeeded"]
        finally:
            exporter.terminate()
            exporter.wait(timeout=30)
            log.close()

    # Redis is gone with the stack: a scrape still answers, and says so.
    # (The exporter was stopped above; this checks the collector directly, the way a scrape calls it.)
    from orchestrator.fleet.fleetmetrics import FleetCollector
    from orchestrator.lifecycle.ledger import Ledger

    families = {f.name: f for f in FleetCollector(Ledger.from_url(stack.settings.broker_url)).collect()}
    assert [s.value for s in families["vitbatch_up"].samples] == [0]


def test_flowers_metrics_need_the_same_credentials_as_its_pages():
    settings = Settings(flower_user="ops", flower_password="s3cret-flower")
    with EmbeddedStack(workers=0, flower=True, settings=settings) as stack:
        _wait_for(lambda: _get(stack.flower_url + "/healthcheck")[0] == 200, "Flower")
        assert _get(stack.flower_url + "/metrics")[0] == 401
        assert _get(stack.flower_url + "/metrics", ("ops", "wrong"))[0] == 401
        status, body = _get(stack.flower_url + "/metrics", ("ops", "s3cret-flower"))
        assert status == 200 and "# TYPE flower_" in body
        assert _get(stack.flower_url + "/workers")[0] == 401  # the pages, for comparison
