"""The Celery app shared by producers and workers, configured for at-least-once delivery.

Both sides build it from the same Settings, so the visibility timeout and the time
limits agree everywhere (a producer with a shorter visibility timeout would make
Redis redeliver running shards).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from orchestrator.config import Settings
from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE, QUEUE_TRAIN, TASK_FINETUNE
from orchestrator.errors import ConfigError
from orchestrator.fleet.redisendpoint import CONNECT_TIMEOUT_S, HEALTH_CHECK_INTERVAL_S, SOCKET_TIMEOUT_S


def make_app(settings: Settings) -> Celery:
    """The app for these settings; ConfigError when they would make Redis redeliver running shards."""
    broker = settings.broker_url or "redis://127.0.0.1:6379/0"
    if settings.visibility_timeout_s <= settings.task_time_limit_s:
        raise ConfigError(
            f"VITBATCH_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed VITBATCH_TASK_TIME_LIMIT_S "
            f"({settings.task_time_limit_s}), or Redis redelivers shards that are still running: raise the first "
            "or lower the second, the same on submitters and workers"
        )
    backend = settings.backend_url or broker
    app = Celery("vitbatch", broker=broker, backend=backend)
    # Timeouts, keepalive and health checks from redisendpoint.py: a primary cut off mid-job
    # costs seconds past the sentinels' promotion, not the kernel's retransmission minutes.
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    # A worker consuming several queues always takes from the first non-empty one in the
    # order it was given (interactive before bulk), instead of round-robin.
    broker_options = {**visibility, "queue_order_strategy": "priority",
                      **settings.redis_endpoint(broker).transport_options()}
    backend_options = {**visibility, **settings.redis_endpoint(backend).transport_options()}
    app.conf.update(
        # JSON only: a pickled or YAML message is refused before anything of it runs.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Ack after the shard is committed; a worker that dies mid-shard gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 60),
        broker_transport=settings.redis_endpoint(broker).kombu_transport,
        broker_transport_options=broker_options,
        result_backend_transport_options=backend_options,
        # Celery's Redis backend reads its connection options from these (not its transport options).
        redis_socket_timeout=SOCKET_TIMEOUT_S,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_keepalive=True,
        redis_retry_on_timeout=True,
        redis_backend_health_check_interval=HEALTH_CHECK_INTERVAL_S,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        result_expires=7 * 24 * 3600,
        task_default_queue=QUEUE_DEFAULT,
        task_queues=[Queue(QUEUE_INTERACTIVE), Queue(QUEUE_DEFAULT), Queue(QUEUE_TRAIN)],
        task_routes={TASK_FINETUNE: {"queue": QUEUE_TRAIN}},
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # The progress numbers live in the ledger; Celery results are not needed.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
