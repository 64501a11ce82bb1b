"""The multi-host tier: one lab per test module (a bridge, a hub, Redis hosts, worker hosts; see hostlab.py).

Needs root (network namespaces, veth pairs, tc). Every namespace is named after this session's
pid, removed at teardown, and swept by a later session if this one was killed first.
"""

from __future__ import annotations

import secrets

import pytest
from hostlab import AWS_ENV, HUB_IP, S3_PORT, Fleet, Lab, World, sweep_stale_labs

from orchestrator.config import Settings

WORKER_HOSTS = ("w1", "w2", "w3")
SPARE_HOSTS = ("w4", "w5")  # on the network, no worker until a scenario starts one
REDIS_HOSTS = ("r1", "r2")  # the primary and its replica, each with a sentinel (the third is the hub's)
N_IMAGES = 40  # eight shards of five
BUCKET = "vitbatch-hosts"
# Heartbeats every 2 s; a shard silent for 8 s (four missed beats) or heartbeating without
# progress for 12 s is handed to another host. Shorter stale times re-enqueued healthy shards
# when the two cores were busy with the rest of the suite.
TIMINGS = dict(heartbeat_s=2, stale_after_s=8, stall_after_s=12, max_attempts=3, task_time_limit_s=300,
               visibility_timeout_s=400, redis_retry_s=90)


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
    from sentinelhosts import MASTER_NAME, SentinelHosts

    from orchestrator.stack.demo import write_digits

    sweep_stale_labs()
    workdir = tmp_path_factory.mktemp("hosts")
    lab, fleet = Lab(), None
    try:
        lab.add_host("hub", HUB_IP)
        for i, name in enumerate(WORKER_HOSTS + SPARE_HOSTS, start=1):
            lab.add_host(name, f"10.77.0.{10 + i}")
        for i, name in enumerate(REDIS_HOSTS, start=1):
            lab.add_host(name, f"10.77.0.{20 + i}")
        fleet = Fleet(lab, workdir, Settings())
        # Every client reaches Redis through three sentinels, as in a deployment that survives losing it.
        redis = SentinelHosts(fleet, *REDIS_HOSTS, f"hosts-{secrets.token_hex(8)}", f"watch-{secrets.token_hex(8)}")
        redis.start()
        fleet.settings = Settings(broker_url=redis.url(), sentinel_master=MASTER_NAME,
                                  sentinel_password=redis.sentinel_password,
                                  s3_endpoint_url=f"http://{HUB_IP}:{S3_PORT}",
                                  model_cache_dir=str(workdir / "model-cache"), **TIMINGS)
        fleet.start_s3()
        for name in WORKER_HOSTS:
            fleet.start_worker(name)
        fleet.start_reconciler()
        write_digits(workdir / "digits", limit=N_IMAGES)
        keys = lab.call(_upload, workdir / "digits", BUCKET)

        from orchestrator.submission.submit import Client

        client = lab.call(Client.from_settings, fleet.settings)
        for name in WORKER_HOSTS:
            fleet.wait_ready(name)
        yield World(lab, fleet, client, f"s3://{BUCKET}/digits/", keys, tiny_model, BUCKET, redis)
    finally:
        if fleet is not None:
            fleet.close()
        lab.close()

