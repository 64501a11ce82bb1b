"""Chaos fixtures: every test gets its own Redis server and its own worker processes.

Killing this Redis or these workers never touches the session servers other tests
use. The moto S3 server and the tiny model are shared (read-only inputs, one output
prefix per test). Timeouts are short so that silence is noticed within seconds.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import pytest
from chaos_stack import ROOT, ChaosWorkers, Stack
from faulty_s3 import FaultyS3

from orchestrator.config import Settings
from orchestrator.stack.processes import RedisServer, settings_env
from orchestrator.submission.submit import Client

BUCKET = "vitbatch-chaos"
N_IMAGES = 160  # two 100-image shards (the last one short) at the default shard size
CHAOS_SETTINGS = dict(heartbeat_s=1, stale_after_s=6, max_attempts=3, task_time_limit_s=300, visibility_timeout_s=400)


@dataclass(frozen=True)
class Digits:
    s3_prefix: str
    keys: frozenset[str]  # what a job over them must return, once each


@pytest.fixture(scope="session")
def digits(tmp_path_factory, s3) -> Digits:
    """Real digit PNGs (32x32) in the moto bucket, shared read-only by every chaos test."""
    from orchestrator.stack.demo import write_digits

    local = tmp_path_factory.mktemp("chaos-digits")
    write_digits(local, limit=N_IMAGES)
    s3.create_bucket(Bucket=BUCKET)
    keys = set()
    for path in sorted(local.rglob("*.png")):
        key = path.relative_to(local).as_posix()
        s3.put_object(Bucket=BUCKET, Key=f"digits/{key}", Body=path.read_bytes())
        keys.add(key)
    return Digits(f"s3://{BUCKET}/digits/", frozenset(keys))


@pytest.fixture
def slow_s3(s3_endpoint):
    """S3 whose object reads take 20 ms each: a 100-image shard lasts seconds, however idle the CPU."""
    with FaultyS3(s3_endpoint, delay_s=0.02) as proxy:
        yield proxy


@pytest.fixture
def chaos_redis(tmp_path):
    """A Redis server for this test alone (append-only, so kill -9 and restart keeps its data)."""
    server = RedisServer(tmp_path / "redis", password=f"chaos-redis-{secrets.token_hex(8)}").start()
    yield server
    server.kill()


@pytest.fixture
def stack(chaos_redis, s3_endpoint, tiny_model, tmp_path, request) -> Stack:
    settings = Settings(broker_url=chaos_redis.url(), s3_endpoint_url=s3_endpoint,
                        model_cache_dir=str(tmp_path / "model-cache"), **CHAOS_SETTINGS)
    env = settings_env(settings)
    # Two cores shared by several workers: torch's intra-op threads would only fight each other.
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    client = Client.from_settings(settings)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    name = re.sub(r"[^\w-]", "-", request.node.name)
    world = Stack(chaos_redis, settings, env, client, ChaosWorkers(env, log_dir, client.app),
                  output=f"s3://{BUCKET}/out/{name}-{secrets.token_hex(3)}/", model=tiny_model)
    yield world
    world.workers.stop_all()
    client.app.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each test's call-phase report on its item (`item.rep_call`), for fixtures that act on a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report
