"""Settings: one object, read from the environment (prefix VITBATCH_) when asked."""

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.fleet.redisendpoint import RedisEndpoint


class Settings(BaseSettings):
    """Everything a deployment tunes. Build with `Settings()`; never read os.environ elsewhere."""

    model_config = SettingsConfigDict(env_prefix="VITBATCH_", extra="ignore")

    broker_url: str | None = Field(
        None, description="Redis URL of the Celery broker; unset means `run` starts the embedded stack."
    )
    result_backend: str | None = Field(
        None, description="Redis URL for job state and Celery results; defaults to broker_url."
    )
    sentinel_master: str = Field(
        "mymaster", description="Redis Sentinel's name of the primary; used when the broker or backend URL is "
        "sentinel://HOST:PORT;sentinel://... (kombu's format).",
    )
    sentinel_password: str | None = Field(
        None, description="Password of the sentinels themselves (their requirepass); the Redis password goes in "
        "the first sentinel:// entry of the URL.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto); unset means AWS."
    )
    s3_max_attempts: int = Field(8, description="boto3 'standard' retry attempts for transient S3 errors.")
    task_time_limit_s: int = Field(3600, description="Hard time limit of one shard task.")
    visibility_timeout_s: int = Field(
        4000,
        description="Seconds before Redis redelivers an unacknowledged shard; must exceed task_time_limit_s.",
    )
    max_object_bytes: int = Field(64 * 1024 * 1024, description="Objects larger than this are error rows.")
    max_tar_bytes: int = Field(4 * 1024**3, description="A .tar input shard larger than this is refused (read whole).")
    max_pixels: int = Field(50_000_000, description="Decoded images larger than this are error rows.")
    decode_processes: int | None = Field(
        None, gt=0, description="Decode processes per worker (decode=processes or device); unset = one per core."
    )
    max_attempts: int = Field(3, description="Deliveries of one shard before it is quarantined.")
    interactive_max_shards: int = Field(
        4, description="Jobs with at most this many shards take the interactive lane (lane=auto)."
    )
    heartbeat_s: float = Field(5.0, description="How often a worker says it still holds a shard.")
    stale_after_s: float = Field(
        120.0, description="A running shard silent this long is re-enqueued by the reconciler."
    )
    stall_after_s: float = Field(
        300.0, gt=0, description="A shard that heartbeats but has not advanced this long is handed to another "
        "worker by the reconciler (classify, embed, attention).",
    )
    redis_retry_s: float = Field(
        60.0, ge=0, description="How long `wait`, `status`, `reconcile --loop` and the fleet exporter ride out "
        "an unreachable Redis (a restart) before giving up.",
    )
    reconcile_max_errors: int = Field(
        5, gt=0, description="Reconciler passes over one job that may fail in a row before the job is marked failed.",
    )
    job_ttl_s: int = Field(
        30 * 24 * 3600, gt=0, description="Seconds a finished job's state stays in Redis (its output keeps its record)."
    )
    model_cache_dir: str = Field("~/.cache/vitbatch/models", description="Where s3:// models are downloaded.")
    flower_user: str = Field("vitbatch", description="Flower basic-auth user.")
    flower_password: str = Field("vitbatch", description="Flower basic-auth password; change it.")
    metrics_port: int = Field(
        0, ge=0, lt=65536,
        description="Prometheus port of a worker process; 0 = off. `worker --gpus`: the base, plus each GPU's index.",
    )
    metrics_address: str = Field("0.0.0.0", description="Address the worker's metrics endpoint listens on.")

    @field_validator("broker_url", "result_backend", "sentinel_password", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return value or None

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url

    def redis_endpoint(self, url: str) -> RedisEndpoint:
        """`url` (the broker's or the backend's) with the Sentinel settings it may need."""
        return RedisEndpoint(url, self.sentinel_master, self.sentinel_password)
