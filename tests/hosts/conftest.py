"""The multi-host tier: one lab per test module (a bridge, a hub, worker hosts; see hostlab.py).

Needs root (network namespaces, veth pairs, tc). Every namespace is named after this session's
pid, removed at teardown, and swept by a later session if this one was killed first.
"""

from __future__ import annotations

import secrets

import pytest
from hostlab import AWS_ENV, HUB_IP, REDIS_PORT, S3_PORT, Fleet, Lab, World, sweep_stale_labs

from orchestrator.config import Settings

WORKER_HOSTS = ("w1", "w2", "w3")
SPARE_HOSTS = ("w4", "w5")  # on the network, no worker until a scenario starts one
N_IMAGES = 40  # eight shards of five
BUCKET = "vitbatch-hosts"
# Heartbeats every 2 s; a shard silent for 8 s (four missed beats) or heartbeating without
# progress for 12 s is handed to another host. Shorter stale times re-enqueued healthy shards
# when the two cores were busy with the rest of the suite.
TIMINGS = dict(heartbeat_s=2, stale_after_s=8, stall_after_s=12, max_attempts=3, task_time_limit_s=300,
               visibility_timeout_s=400, redis_retry_s=90)
# The failover lab's one worker loads its model inside its first shard (over 12 s on two busy cores).
FAILOVER_TIMINGS, FAILOVER_IMAGES = {**TIMINGS, "stall_after_s": 30}, 20


def _upload(folder, bucket: str) -> frozenset[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://{HUB_IP}:{S3_PORT}", **{
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"]})
    s3.create_bucket(Bucket=bucket)
    keys = set()
    for path in sorted(folder.rglob("*.png")):
        key = path.relative_to(folder).as_posix()
        s3.put_object(Bucket=bucket, Key=f"digits/{key}", Body=path.read_bytes())
        keys.add(key)
    return frozenset(keys)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    from orchestrator.demo import write_digits

    sweep_stale_labs()
    workdir = tmp_path_factory.mktemp("hosts")
    lab, fleet = Lab(), None
    try:
        lab.add_host("hub", HUB_IP)
        for i, name in enumerate(WORKER_HOSTS + SPARE_HOSTS, start=1):
            lab.add_host(name, f"10.77.0.{10 + i}")
        password = f"hosts-{secrets.token_hex(8)}"
        settings = Settings(broker_url=f"redis://:{password}@{HUB_IP}:{REDIS_PORT}/0",
                            s3_endpoint_url=f"http://{HUB_IP}:{S3_PORT}",
                            model_cache_dir=str(workdir / "model-cache"), **TIMINGS)
        fleet = Fleet(lab, workdir, settings, password)
        fleet.start_redis()
        fleet.start_s3()
        for name in WORKER_HOSTS:
            fleet.start_worker(name)
        fleet.start_reconciler()
        write_digits(workdir / "digits", limit=N_IMAGES)
        keys = lab.call(_upload, workdir / "digits", BUCKET)

        from orchestrator.submit import Client

        client = lab.call(Client.from_settings, settings)
        for name in WORKER_HOSTS:
            fleet.wait_ready(name)
        yield World(lab, fleet, client, f"s3://{BUCKET}/digits/", keys, tiny_model, BUCKET)
    finally:
        if fleet is not None:
            fleet.close()
        lab.close()


@pytest.fixture(scope="module")
def failover_world(tmp_path_factory, tiny_model):
    """A lab of its own for Redis Sentinel: the primary (and a sentinel) on r1, the replica (and a
    sentinel) on r2, the third sentinel with S3 and the reconciler on the hub, one worker on w1; every
    client reaches Redis through the sentinels. A tiny job (four shards). Yields (World, SentinelHosts)."""
    from sentinelhosts import MASTER_NAME, SentinelHosts

    from orchestrator.demo import write_digits
    from orchestrator.submit import Client

    sweep_stale_labs()
    workdir = tmp_path_factory.mktemp("failover")
    lab, fleet = Lab(), None
    try:
        lab.add_host("hub", HUB_IP)
        lab.add_host("w1", "10.77.0.11")
        for i, name in enumerate(("r1", "r2"), start=1):
            lab.add_host(name, f"10.77.0.{20 + i}")
        redis_password = f"hosts-{secrets.token_hex(8)}"
        fleet = Fleet(lab, workdir, Settings(), redis_password)
        group = SentinelHosts(fleet, "r1", "r2", redis_password, f"watch-{secrets.token_hex(8)}").start()
        fleet.settings = Settings(broker_url=group.url(), sentinel_master=MASTER_NAME,
                                  sentinel_password=group.sentinel_password, s3_endpoint_url=f"http://{HUB_IP}:{S3_PORT}",
                                  model_cache_dir=str(workdir / "model-cache"), **FAILOVER_TIMINGS)
        fleet.start_s3()
        fleet.start_worker("w1")
        fleet.start_reconciler()
        write_digits(workdir / "digits", limit=FAILOVER_IMAGES)
        keys = lab.call(_upload, workdir / "digits", BUCKET)
        client = lab.call(Client.from_settings, fleet.settings)
        fleet.wait_ready("w1")
        yield World(lab, fleet, client, f"s3://{BUCKET}/digits/", keys, tiny_model, BUCKET), group
    finally:
        if fleet is not None:
            fleet.close()
        lab.close()
