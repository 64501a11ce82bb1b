"""Redis Sentinel: the broker, the ledger and the CLI reach Redis through three sentinels; the
primary is killed mid-job after acknowledging commits its replica never received, the sentinels
promote the replica, and the job still writes every key once."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys

import pytest
import redis
from chaos_stack import ROOT, ChaosWorkers, Stack, assert_exactly_once, explain, via
from faulty_s3 import FaultyS3
from sentinels import MASTER_NAME, SentinelGroup, until

from orchestrator.config import Settings
from orchestrator.constants import job_key, shard_state_key
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.stack.processes import settings_env
from orchestrator.submission.submit import Client

pytestmark = pytest.mark.chaos
BUCKET = "vitbatch-sentinel"
N_IMAGES, SHARD_SIZE = 60, 15  # four shards: some run before the failover, some after
HA_SETTINGS = {"heartbeat_s": 1, "stale_after_s": 6, "max_attempts": 3, "task_time_limit_s": 300,
               "visibility_timeout_s": 400}


@pytest.fixture(scope="module")
def digits(s3, tmp_path_factory) -> tuple[str, frozenset[str]]:
    """60 digit PNGs in their own bucket: the input prefix and the keys a job over it reports."""
    from orchestrator.stack.demo import write_digits

    local = tmp_path_factory.mktemp("sentinel-digits")
    write_digits(local, limit=N_IMAGES)
    s3.create_bucket(Bucket=BUCKET)
    keys = set()
    for path in sorted(local.rglob("*.png")):
        key = path.relative_to(local).as_posix()
        s3.put_object(Bucket=BUCKET, Key=f"digits/{key}", Body=path.read_bytes())
        keys.add(key)
    return f"s3://{BUCKET}/digits/", frozenset(keys)


@pytest.fixture
def group(tmp_path):
    sentinels = SentinelGroup(tmp_path / "redis", redis_password=f"ha-redis-{secrets.token_hex(8)}",
                              sentinel_password=f"ha-sentinel-{secrets.token_hex(8)}").start()
    yield sentinels
    sentinels.stop()


@pytest.fixture
def slower_s3(s3_endpoint):
    """50 ms an object read: a 15-image shard lasts most of a second, however idle the CPU."""
    with FaultyS3(s3_endpoint, delay_s=0.05) as proxy:
        yield proxy


@pytest.fixture
def ha(group, s3_endpoint, tiny_model, tmp_path, request) -> Stack:
    """The chaos stack with every client on the sentinel:// URL (its master name and sentinel password set)."""
    settings = Settings(broker_url=group.url(), sentinel_master=MASTER_NAME, sentinel_password=group.sentinel_password,
                        s3_endpoint_url=s3_endpoint, model_cache_dir=str(tmp_path / "model-cache"), **HA_SETTINGS)
    env = settings_env(settings)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    client = Client.from_settings(settings)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    name = re.sub(r"[^\w-]", "-", request.node.name)
    world = Stack(group.primary(), settings, env, client, ChaosWorkers(env, log_dir, client.app),
                  output=f"s3://{BUCKET}/out/{name}-{secrets.token_hex(3)}/", model=tiny_model)
    yield world
    world.workers.stop_all()
    client.app.close()


def committed(server, group: SentinelGroup, job_id: str) -> set[str]:
    """The shards `server` itself records as committed (read from it directly, not through the sentinels)."""
    client = redis.Redis(port=server.port, password=group.redis_password, decode_responses=True)
    return {shard for shard, state in client.hgetall(shard_state_key(job_id)).items()
            if state == ShardState.COMMITTED.value}


def test_the_primary_killed_mid_job_its_replica_is_promoted_and_every_key_is_written_once(ha, group, slower_s3,
                                                                                            digits):
    prefix, keys = digits
    worker = ha.workers.start("w", env=via(slower_s3))
    job_id = ha.submit(prefix, read_concurrency=1, shard_size=SHARD_SIZE)
    ha.running_shard(job_id)
    waiter = subprocess.Popen([sys.executable, "-m", "orchestrator.commands.cli", "wait", job_id], env=ha.env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    old = group.primary()
    group.relay.freeze()  # from here on the primary's writes never reach the replica
    before = committed(old, group, job_id)
    until(lambda: committed(old, group, job_id) - before, 120, "no shard committed on the primary after the freeze")
    lost = committed(old, group, job_id) - before
    unreplicated = lost - committed(next(s for s in group.servers if s is not old), group, job_id)
    old.kill()  # kill -9: the commits it acknowledged since the freeze die with it
    group.relay.sever()
    new = group.wait_promoted(old)
    out, err = waiter.communicate(timeout=180)
    status = ha.client.status(job_id)

    assert lost and unreplicated == lost, "the primary acknowledged commits that the replica never received"
    assert waiter.returncode == 0, f"`vitbatch wait` through the sentinels: {out[-2000:]}\n{err[-3000:]}"
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert new is not old and group.addresses[ha.client.ledger.r.connection_pool.get_master_address()[1]] is new
    promoted = redis.Redis(port=new.port, password=group.redis_password, decode_responses=True)
    assert promoted.hget(job_key(job_id), "state") == JobState.SUCCEEDED.value, "the job ended on the new primary"
    assert worker.poll() is None, "the worker followed the failover instead of dying"
    assert "Connection to broker lost" in ha.workers.log("w"), "the worker's broker connection went down with the primary"
    assert_exactly_once(ha.output, keys, ha.store)
