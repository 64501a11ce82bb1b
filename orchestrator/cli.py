"""`vitbatch`: submit, run, watch and serve jobs (typer + rich)."""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import types
import typing
from contextlib import ExitStack

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from orchestrator.config import Settings
from orchestrator.errors import VitbatchError
from orchestrator.jobs import JOB_KINDS, SPEC_CLASSES, parse_spec
from orchestrator.finalize import stage_seconds
from orchestrator.ledger import JobState, JobStatus

DEFAULT_WORKER_QUEUES = "vitbatch-interactive,vitbatch"
DEFAULT_FLOWER_PASSWORD = Settings.model_fields["flower_password"].default
app = typer.Typer(help="Dataset-scale Vision Transformer jobs on Celery + Redis.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
submit_app = typer.Typer(help="Validate, plan and enqueue a job; print its id.", no_args_is_help=True)
run_app = typer.Typer(help="Submit and wait with a progress bar (embedded stack when no broker is set).",
                      no_args_is_help=True)
app.add_typer(submit_app, name="submit")
app.add_typer(run_app, name="run")
console = Console()
err = Console(stderr=True)


def _client(settings: Settings | None = None):
    from orchestrator.submit import Client

    return Client.from_settings(settings)


def _eta_text(eta_s: float | None) -> str:
    """The job's ETA as h:mm:ss ("?" before the first item: no rate yet)."""
    if eta_s is None:
        return "?"
    minutes, seconds = divmod(int(round(eta_s)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def _progress_bar() -> Progress:
    # The ETA is the ledger's (JobStatus.eta_s, the job's whole rate), the same that `status` prints.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s, ETA {task.fields[eta]}"), console=err)


def _watch(client, job_id: str, n_items: int) -> JobStatus:
    with _progress_bar() as bar:
        task = bar.add_task(job_id, total=n_items, rate="0", eta="?")

        def update(status: JobStatus) -> None:
            bar.update(task, completed=status.done, description=f"{job_id} {status.state.value}",
                       rate=f"{status.images_per_s:.1f}", eta=_eta_text(status.eta_s))

        return client.wait(job_id, on_update=update)


def _report(status: JobStatus, show_rows: int = 0, client=None) -> None:
    colour = "green" if status.state is JobState.SUCCEEDED else "red"
    console.print(f"[{colour}]{status.job_id}: {status.state.value}[/] - {status.done}/{status.n_items} items, "
                  f"{status.errors} error rows, {status.images_per_s:.1f} img/s"
                  + ("" if status.state.terminal else f", ETA {_eta_text(status.eta_s)}"))
    if status.reason:
        console.print(f"reason: {status.reason}")
    for shard, reason in sorted(status.failed_shards.items()):
        console.print(f"  shard {shard}: {reason}")
    if status.requeued:
        console.print(f"reconciler re-enqueued {status.requeued} silent shard(s)")
    console.print(f"results: {status.output}")
    if show_rows and status.state is JobState.SUCCEEDED:
        from orchestrator.results import read_table

        table = read_table(status.output, client.store, limit_parts=1, job_id=status.job_id)
        table = table.slice(0, show_rows).to_pylist()
        view = Table("key", "label", "score", "error")
        for row in table:
            score = "" if row["score"] is None else f"{row['score']:.3f}"
            view.add_row(row["key"], str(row["label"] or ""), score, row["error"] or "")
        console.print(view)


def _exit_code(status: JobStatus) -> int:
    return 0 if status.state is JobState.SUCCEEDED else 1


def _submit(spec, wait: bool, workers: int, overwrite: bool, show_rows: int = 5) -> None:
    settings = Settings()
    embedded = wait and not settings.broker_url
    with ExitStack() as stack:
        if embedded:
            from orchestrator.embedded import EmbeddedStack

            err.print(f"no VITBATCH_BROKER_URL: starting the embedded stack with {workers} worker(s)")
            embedded_stack = stack.enter_context(EmbeddedStack(workers=workers, settings=settings))
            settings = embedded_stack.settings
            for url in embedded_stack.metrics_urls:
                err.print(f"worker metrics: {url}")
        client = _client(settings)
        job_id, summary = client.submit(spec, overwrite=overwrite)
        err.print(f"job {job_id}: {summary['items']} images"
                  + (f" in {summary['shards']} shard(s)" if "shards" in summary else "")
                  + (f", {len(summary['classes'])} classes" if "classes" in summary else "")
                  + (f", {summary['ignored_non_images']} non-image files ignored" if summary.get("ignored_non_images") else "")
                  + (f", {summary['duplicate_keys']} duplicate keys dropped" if summary.get("duplicate_keys") else "")
                  + (f", {summary['skipped']} entries skipped (e.g. {summary['skipped_examples'][0]})"
                     if summary.get("skipped") else ""))
        if not wait:
            console.print(job_id)
            return
        status = _watch(client, job_id, summary["items"])
        _report(status, show_rows, client)
    raise typer.Exit(_exit_code(status))


def _cli_type(annotation, default):
    """The type typer parses for a spec field: lists, literals and JSON objects arrive as text."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal or origin is list or annotation is dict or origin is dict:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.Optional[_cli_type(inner[0], default)]
    return annotation


def _json_argument(value: str) -> str:
    """A JSON option as typed, or the text of FILE for `@FILE` (a long --config is easier in a file)."""
    if not value.startswith("@"):
        return value
    try:
        with open(os.path.expanduser(value[1:]), encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise VitbatchError(f"cannot read {value[1:]!r} for --config ({e.strerror}): give a JSON object or @file.json")


def _job_command(group: typer.Typer, kind: str, wait: bool) -> None:
    """One command per job kind, its options generated from the spec's fields and descriptions."""
    spec_cls = SPEC_CLASSES[kind]
    params = []
    for name, field in spec_cls.model_fields.items():
        if name == "kind":
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(v) for v in default)
        flag = "--" + name.replace("_", "-")
        option = typer.Option(... if field.is_required() else default, flag, help=field.description)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_cli_type(field.annotation, default)))
    params.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, help="Replace a finished job's output.")))
    params.append(inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                                    default=typer.Option(1, help="Embedded stack only: local worker processes.")))

    def command(**kwargs) -> None:
        overwrite, workers = kwargs.pop("overwrite"), kwargs.pop("workers")
        if isinstance(kwargs.get("config"), str):
            kwargs["config"] = _json_argument(kwargs["config"])
        spec = parse_spec({"kind": kind, **{k: v for k, v in kwargs.items() if v is not None}})
        _submit(spec, wait, workers, overwrite, show_rows=5 if kind == "classify" else 0)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = spec_cls.__doc__
    group.command(kind)(command)


for _kind in JOB_KINDS:
    _job_command(submit_app, _kind, wait=False)
    _job_command(run_app, _kind, wait=True)


@app.command()
def status(job_id: str, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show a job's state and totals."""
    client = _client()
    job = client.status(job_id)
    stages = stage_seconds(client.ledger.shard_stats(job_id))
    if as_json:
        console.print_json(json.dumps({**job.to_json(), "stage_seconds": stages}))
    else:
        _report(job)
        console.print(f"shards: {job.shards}")
        if stages:
            console.print("seconds per stage (summed over committed shards): "
                          + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in stages.items()))


@app.command()
def wait(job_id: str) -> None:
    """Wait with a progress bar; exit 0 when the job succeeded, 1 otherwise."""
    client = _client()
    status = _watch(client, job_id, client.status(job_id).n_items)
    _report(status)
    raise typer.Exit(_exit_code(status))


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: queued shards are skipped, running shards stop at their next batch."""
    _report(_client().cancel(job_id))


@app.command()
def retry(job_id: str) -> None:
    """Re-enqueue only the shards that failed or never committed."""
    shards = _client().retry(job_id)
    console.print(f"re-enqueued {len(shards)} shard(s): {shards}")


@app.command()
def reconcile(loop: bool = typer.Option(False, help="Keep reconciling until Ctrl-C."),
              stale_after_s: float = typer.Option(None, help="Override VITBATCH_STALE_AFTER_S.")) -> None:
    """Re-enqueue shards whose worker went silent; finalize jobs whose last worker died."""
    from orchestrator.reconcile import reconcile as reconcile_once

    client = _client()
    stale = stale_after_s or client.settings.stale_after_s
    while True:
        result = reconcile_once(client, stale)
        for job_id, shards in result.requeued.items():
            console.print(f"{job_id}: re-enqueued silent shards {shards}")
        for job_id in result.finalized:
            console.print(f"{job_id}: finalized")
        if not loop:
            return
        time.sleep(client.settings.heartbeat_s)


@app.command()
def jobs(limit: int = 20) -> None:
    """List recent jobs."""
    client = _client()
    for job_id in client.ledger.recent_jobs(limit):
        status = client.status(job_id)
        console.print(f"{job_id}  {status.kind:9} {status.state.value:22} {status.done}/{status.n_items}  {status.output}")


schedule_app = typer.Typer(help="Scheduled jobs (nightly reclassification) from a TOML file.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("check")
def schedule_check(file: str = typer.Option(..., "--file", "-f", help="Schedules TOML file.")) -> None:
    """Validate a schedules file and show when each entry runs next."""
    from datetime import datetime, timezone

    from orchestrator.schedule import load_schedules

    for entry in load_schedules(file):
        wait_s = entry.crontab().remaining_estimate(datetime.now(timezone.utc)).total_seconds()
        console.print(f"{entry.name}: '{entry.cron}' {entry.timezone}, {entry.job['kind']} -> "
                      f"{entry.job['output']}, next run in {max(wait_s, 0) / 3600:.1f} h")


@schedule_app.command("run")
def schedule_run(name: str, file: str = typer.Option(..., "--file", "-f", help="Schedules TOML file.")) -> None:
    """Start one run of a schedule now (what beat does on time); print the run record."""
    from orchestrator.schedule import load_schedules, start_run

    entries = {e.name: e for e in load_schedules(file)}
    if name not in entries:
        raise VitbatchError(f"no schedule {name!r} in {file}; it has {sorted(entries)}")
    console.print_json(json.dumps(start_run(_client(), entries[name])))


@app.command()
def runs(name: str, limit: int = 20, as_json: bool = typer.Option(False, "--json")) -> None:
    """List past runs of a schedule: changed/unchanged/failed counts and images/s."""
    from orchestrator.schedule import runs as list_runs

    records = list_runs(_client(), name, limit)
    if as_json:
        console.print_json(json.dumps(records))
        return
    view = Table("run", "job", "state", "computed", "carried over", "errors", "img/s", "output")
    for r in records:
        view.add_row(r["run_id"], r["job_id"], r["state"], str(r["processed"]), str(r["carried"]),
                     str(r["errors"]), str(r["images_per_s"]), r["output"])
    console.print(view)


@app.command()
def beat(file: str = typer.Option(..., "--file", "-f", help="Schedules TOML file."),
         state_dir: str = typer.Option("~/.cache/vitbatch/beat", help="Where beat keeps its last-run times.")) -> None:
    """Run Celery beat with the schedules in FILE (one beat per deployment)."""
    from pathlib import Path

    from orchestrator.celery_app import make_app
    from orchestrator.schedule import beat_schedule, load_schedules

    settings = Settings()
    if not settings.broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the workers use")
    entries = load_schedules(file)
    celery = make_app(settings)
    celery.conf.beat_schedule = beat_schedule(entries)
    folder = Path(state_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    err.print(f"beat: {len(entries)} schedule(s): {', '.join(e.name for e in entries)}")
    celery.Beat(schedule=str(folder / "schedule.db"), loglevel="INFO").run()


@app.command()
def schema() -> None:
    """Print the JSON schema of job specs."""
    from orchestrator.jobs import _ADAPTER

    console.print_json(json.dumps(_ADAPTER.json_schema()))


@app.command()
def worker(queues: str = typer.Option(DEFAULT_WORKER_QUEUES, help="Comma-separated queues, highest priority first."),
           shards_in_flight: int = typer.Option(
               None, min=1, help="Shards held at once: the next one reads and decodes while this one computes "
               "(default: 2 on a GPU host, 1 on a CPU-only host)."),
           pool: str = typer.Option("auto", help="auto (threads, or solo for one shard in flight), threads, solo."),
           name: str = typer.Option("vitbatch", help="Worker name; the host is appended."),
           gpus: str = typer.Option(None, help="'all' or ids like 0,2: one worker process per GPU.")) -> None:
    """Start a worker in the foreground (same as `celery -A workers worker`)."""
    from orchestrator.processes import worker_command

    if not Settings().broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the jobs are submitted to")
    if gpus:
        from orchestrator.gpupool import supervise, visible_gpus

        from orchestrator.gpupool import metrics_port

        chosen = visible_gpus(gpus)
        err.print(f"starting {len(chosen)} worker(s), one per GPU: {chosen}")
        base = Settings().metrics_port
        for position, gpu in enumerate(chosen if base else []):
            err.print(f"GPU {gpu} metrics: port {metrics_port(base, gpu, position)} (/metrics)")
        raise typer.Exit(supervise(chosen, lambda gpu: worker_command(f"{name}-gpu{gpu}", queues, shards_in_flight, pool),
                                   metrics_base=base))
    cmd = worker_command(name, queues, shards_in_flight, pool)
    os.execv(cmd[0], cmd)


@app.command()
def flower(port: int = typer.Option(5555, help="HTTP port."),
           address: str = typer.Option("127.0.0.1", help="Listen address (0.0.0.0 in a container).")) -> None:
    """Start Flower with basic auth (VITBATCH_FLOWER_USER / VITBATCH_FLOWER_PASSWORD)."""
    from orchestrator.processes import flower_command, flower_env

    settings = Settings()
    if not settings.broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the workers use")
    if address not in ("127.0.0.1", "localhost") and settings.flower_password == DEFAULT_FLOWER_PASSWORD:
        raise VitbatchError("refusing to serve Flower beyond localhost with the default password: "
                            "set VITBATCH_FLOWER_PASSWORD")
    cmd = flower_command(port, address)
    os.execve(cmd[0], cmd, {**os.environ, **flower_env(settings.broker_url, settings.flower_user,
                                                       settings.flower_password)})


@app.command()
def metrics(port: int = typer.Option(9808, help="HTTP port of /metrics."),
            address: str = typer.Option("0.0.0.0", help="Listen address.")) -> None:
    """Serve the fleet's Prometheus metrics (queue length per lane, jobs, per-job progress) from Redis.

    One per deployment; each worker serves its own on VITBATCH_METRICS_PORT.
    """
    from orchestrator.exporter import serve
    from orchestrator.ledger import Ledger

    settings = Settings()
    if not settings.broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the workers use")
    err.print(f"fleet metrics: http://{address}:{port}/metrics")
    try:
        serve(Ledger.from_url(settings.backend_url), port, address)
    except KeyboardInterrupt:
        pass


@app.command()
def up(workers: int = typer.Option(1, help="Local worker processes."),
       metrics_port: int = typer.Option(None, help="Base Prometheus port: worker N serves on base+N, the fleet "
                                        "exporter on base+workers (default VITBATCH_METRICS_PORT; 0 = off).")) -> None:
    """Run the embedded stack (Redis, workers, Flower) in the foreground until Ctrl-C."""
    import secrets

    from orchestrator.embedded import EmbeddedStack

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
            from orchestrator.exporter import registry
            from orchestrator.ledger import Ledger
            from prometheus_client import start_http_server

            fleet_port = s.metrics_port + workers
            start_http_server(fleet_port, addr="127.0.0.1", registry=registry(Ledger.from_url(s.backend_url)))
            console.print(f"fleet metrics: http://127.0.0.1:{fleet_port}/metrics")
        console.print("Ctrl-C stops the stack.")
        from orchestrator.reconcile import reconcile as reconcile_once

        client = _client(s)
        try:
            while not stack.dead_workers():
                reconcile_once(client, s.stale_after_s)
                time.sleep(s.heartbeat_s)
            err.print(f"worker(s) exited: {stack.dead_workers()}; see {stack.log_dir}")
        except KeyboardInterrupt:
            pass


def _unreachable(error: BaseException) -> str | None:
    """One line for a Redis, broker or S3 connection failure, or None for any other exception.

    Matched by class module and name, so that this runs without importing botocore; the
    messages of these errors name host and port, never the password in the broker URL.
    """
    for cls in type(error).__mro__:
        module, name = cls.__module__.split(".")[0], cls.__name__
        if module == "redis" and name in ("ConnectionError", "TimeoutError", "AuthenticationError", "BusyLoadingError"):
            return f"cannot reach Redis ({error}): is it running, and is VITBATCH_BROKER_URL right?"
        if module == "kombu" and name == "OperationalError":
            return f"cannot reach the broker ({error}): is Redis running, and is VITBATCH_BROKER_URL right?"
        if module == "botocore" and name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                             "NoCredentialsError", "ConnectionClosedError"):
            return f"cannot reach S3 ({error}): check VITBATCH_S3_ENDPOINT_URL and the AWS_* credentials"
    return None


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except VitbatchError as e:
        err.print(f"[red]error:[/] {rich_escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:
        line = _unreachable(e)
        if line is None:
            raise
        err.print(f"[red]error:[/] {rich_escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
