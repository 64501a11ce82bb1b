"""`python -m orchestrator.fleet.flowerauth [flower options]`: Celery's Flower, with /metrics behind its auth.

Flower 2.2.0 checks credentials per handler (`tornado.web.authenticated`), and its /metrics
handler has none: with FLOWER_BASIC_AUTH set, every page answers 401 without credentials
except /metrics, which shows every worker's name and task counts to anyone who can reach the
port. This entry point adds the same check to /metrics before Flower starts, so Prometheus
scrapes it with basic_auth like a browser. /healthcheck stays open for container probes.

The task list shows the Result and Started columns unless FLOWER_TASKS_COLUMNS says
otherwise: Flower's default columns have neither, so a running shard's row showed no
start time and no progress.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config import Settings

TASK_COLUMNS = "name,uuid,state,result,received,started,runtime,worker"


def protect_metrics() -> None:
    """Wrap Flower's /metrics GET in the check its pages use (idempotent)."""
    from flower.views import monitor
    from tornado import web

    handler = monitor.Metrics
    if not getattr(handler.get, "_vitbatch_authenticated", False):
        handler.get = web.authenticated(handler.get)
        handler.get._vitbatch_authenticated = True


def sentinel_options(settings: Settings) -> None:
    """A sentinel:// broker needs the primary's name and the sentinels' password, which Celery's
    command line cannot pass: they go into the default app, the one `celery flower` uses when
    given no `-A` (Flower's broker page and its event receiver read them there). Any Redis URL
    gets the product's timeouts, keepalive and health checks there too."""
    from celery import current_app

    endpoint = settings.redis_endpoint(os.environ.get("CELERY_BROKER_URL", ""))
    current_app.conf.broker_transport_options = endpoint.transport_options()
    current_app.conf.broker_transport = endpoint.kombu_transport


def main(argv: list[str] | None = None) -> None:
    """The entry point, and so the edge: the settings are built here, from the environment."""
    from celery.bin.celery import main as celery_main

    from orchestrator.config import Settings

    protect_metrics()
    sentinel_options(Settings())
    os.environ.setdefault("FLOWER_TASKS_COLUMNS", TASK_COLUMNS)
    sys.argv = ["celery", "flower", *(sys.argv[1:] if argv is None else argv)]
    celery_main()


if __name__ == "__main__":
    main()
