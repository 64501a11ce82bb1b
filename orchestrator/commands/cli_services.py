"""The CLI's long-running processes: `worker`, `flower`, `metrics` and `up` (the embedded stack)."""

from __future__ import annotations

import os

import typer

from orchestrator.commands.cli_jobs import client_for
from orchestrator.commands.terminal import console, err
from orchestrator.config import Settings
from orchestrator.errors import VitbatchError

DEFAULT_WORKER_QUEUES = "vitbatch-interactive,vitbatch"
DEFAULT_FLOWER_PASSWORD = Settings.model_fields["flower_password"].default


def _broker_url(settings: Settings, who: str) -> str:
    if not settings.broker_url:
        raise VitbatchError(f"set VITBATCH_BROKER_URL to the Redis {who}")
    return settings.broker_url


def worker(queues: str = typer.Option(DEFAULT_WORKER_QUEUES, help="Comma-separated queues, highest priority first."),
           shards_in_flight: int = typer.Option(
               None, min=1, help="Shards held at once: the next one reads and decodes while this one computes "
               "(default: 2 on a GPU host, 1 on a CPU-only host)."),
           pool: str = typer.Option("auto", help="auto (threads, or solo for one shard in flight), threads, solo."),
           name: str = typer.Option("vitbatch", help="Worker name; the host is appended."),
           gpus: str = typer.Option(None, help="'all' or ids like 0,2: one worker process per GPU.")) -> None:
    """Start a worker in the foreground (same as `celery -A workers worker`)."""
    from orchestrator.stack.processes import worker_command

    _broker_url(Settings(), "the jobs are submitted to")
    if gpus:
        from orchestrator.stack.gpupool import metrics_port, supervise, visible_gpus

        chosen = visible_gpus(gpus)
        err.print(f"starting {len(chosen)} worker(s), one per GPU: {chosen}")
        base = Settings().metrics_port
        for position, gpu in enumerate(chosen if base else []):
            err.print(f"GPU {gpu} metrics: port {metrics_port(base, gpu, position)} (/metrics)")
        raise typer.Exit(supervise(chosen, lambda gpu: worker_command(f"{name}-gpu{gpu}", queues, shards_in_flight, pool),
                                   metrics_base=base))
    cmd = worker_command(name, queues, shards_in_flight, pool)
    os.execv(cmd[0], cmd)


def flower(port: int = typer.Option(5555, help="HTTP port."),
           address: str = typer.Option("127.0.0.1", help="Listen address (0.0.0.0 in a container).")) -> None:
    """Start Flower with basic auth (VITBATCH_FLOWER_USER / VITBATCH_FLOWER_PASSWORD)."""
    from orchestrator.stack.processes import flower_command, flower_env

    settings = Settings()
    broker_url = _broker_url(settings, "the workers use")
    if address not in ("127.0.0.1", "localhost") and settings.flower_password == DEFAULT_FLOWER_PASSWORD:
        raise VitbatchError("refusing to serve Flower beyond localhost with the default password: "
                            "set VITBATCH_FLOWER_PASSWORD")
    cmd = flower_command(port, address)
    os.execve(cmd[0], cmd, {**os.environ, **flower_env(broker_url, settings.flower_user, settings.flower_password)})


def metrics(port: int = typer.Option(9808, help="HTTP port of /metrics."),
            address: str = typer.Option("0.0.0.0", help="Listen address.")) -> None:
    """Serve the fleet's Prometheus metrics (queue length per lane, jobs, per-job progress) from Redis.

    One per deployment; each worker serves its own on VITBATCH_METRICS_PORT.
    """
    from orchestrator.fleet.fleetmetrics import serve
    from orchestrator.lifecycle.ledger import Ledger

    settings = Settings()
    _broker_url(settings, "the workers use")
    err.print(f"fleet metrics: http://{address}:{port}/metrics")
    try:
        serve(Ledger.from_settings(settings), port, address)
    except KeyboardInterrupt:
        pass


def up(workers: int = typer.Option(1, help="Local worker processes."),
       metrics_port: int = typer.Option(None, help="Base Prometheus port: worker N serves on base+N, the fleet "
                                        "exporter on base+workers (default VITBATCH_METRICS_PORT; 0 = off).")) -> None:
    """Run the embedded stack (Redis, workers, Flower) in the foreground until Ctrl-C."""
    import secrets

    from orchestrator.stack.embedded import EmbeddedStack

    settings = Settings()
    if settings.flower_password == DEFAULT_FLOWER_PASSWORD:
        settings = settings.model_copy(update={"flower_password": secrets.token_urlsafe(12)})
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    with EmbeddedStack(workers=workers, flower=True, settings=settings) as stack:
        s = stack.settings
        console.print(f"export VITBATCH_BROKER_URL='{s.broker_url}'")
        console.print(f"Flower: {stack.flower_url} (user {s.flower_user}, password {s.flower_password})")
        for url in stack.metrics_urls:
            console.print(f"worker metrics: {url}")
        if s.metrics_port:
            from prometheus_client import start_http_server

            from orchestrator.fleet.fleetmetrics import registry
            from orchestrator.lifecycle.ledger import Ledger

            fleet_port = s.metrics_port + workers
            start_http_server(fleet_port, addr="127.0.0.1", registry=registry(Ledger.from_settings(s)))
            console.print(f"fleet metrics: http://127.0.0.1:{fleet_port}/metrics")
        console.print("Ctrl-C stops the stack.")
        from orchestrator.lifecycle.reconcile import reconcile as reconcile_once

        client = client_for(s)
        try:
            dead = stack.serve(lambda: reconcile_once(client, s.stale_after_s), s.heartbeat_s)
            if dead:
                err.print(f"worker(s) exited: {dead}; see {stack.log_dir}")
        except KeyboardInterrupt:
            pass
