"""Fixtures that start real servers: a Redis-compatible server (valkey from its PyPI wheel),
an S3-compatible HTTP server (moto), and real Celery worker processes."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# Two test processes (-n 2) share two cores with the worker processes they start: one compute
# thread each, or OpenMP pools of every process spin against each other (set before torch loads;
# children inherit it through settings_env). An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from support import ROOT, WorkerPool, build_tiny_vit, run_cli  # noqa: E402

from orchestrator.config import Settings  # noqa: E402
from orchestrator.stack.processes import RedisServer, free_port, settings_env  # noqa: E402

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
}


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _nothing_stays_frozen():
    """Worker code run in the test process freezes what a model load built (workers/memory.py);
    in this process that would keep every earlier test's dropped models. Unfrozen after each test."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), password="test-redis-password").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def settings(redis_server, s3_endpoint, tmp_path_factory) -> Settings:
    return Settings(
        broker_url=redis_server.url(), s3_endpoint_url=s3_endpoint, task_time_limit_s=600,
        visibility_timeout_s=900, model_cache_dir=str(tmp_path_factory.mktemp("model-cache")),
    )


@pytest.fixture(scope="session")
def env(settings) -> dict[str, str]:
    """The environment a CLI or worker process gets: the servers above and nothing else."""
    out = settings_env(settings)
    out.update(S3_ENV)
    out["PYTHONPATH"] = str(ROOT)
    return out


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def bucket(s3) -> str:
    s3.create_bucket(Bucket="vitbatch-test")
    return "vitbatch-test"


@pytest.fixture(scope="session")
def client(settings):
    from orchestrator.submission.submit import Client

    return Client.from_settings(settings)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit", num_labels=10, image_size=32)


@pytest.fixture(scope="module")
def workers(env, client, tmp_path_factory):
    pool = WorkerPool(env, tmp_path_factory.mktemp("worker-logs"), client.app)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def cli(env):
    """Run `vitbatch ARGS` as a separate process against the test servers."""
    return lambda args, timeout_s=240, extra_env=None: run_cli(args, {**env, **(extra_env or {})}, timeout_s)


def upload_dir(s3, local: Path, bucket: str, prefix: str) -> list[str]:
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}"
        s3.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


@pytest.fixture(scope="session")
def upload(s3):
    return lambda local, bucket, prefix: upload_dir(s3, Path(local), bucket, prefix)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    """A tiny HF ViT classifier (tests/helpers_models.py), built once per test process, read-only."""
    from helpers_models import build_hf_vit

    return build_hf_vit(tmp_path_factory.mktemp("hf-vit"))


@pytest.fixture(scope="session")
def timm_model_dir(tmp_path_factory) -> Path:
    from helpers_models import build_timm_vit

    return build_timm_vit(tmp_path_factory.mktemp("timm-vit"))


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """`get(name)`: a tiny model of a class the hub publishes (tests/helpers_checkpoints.py), built once
    per test process, read-only."""
    from helpers_checkpoints import build_checkpoint

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_checkpoint(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get
