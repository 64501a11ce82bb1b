"""`vitbatch`: submit, run, watch and serve jobs (typer + rich)."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.config import Settings
from orchestrator.errors import VitbatchError
from orchestrator.jobs import ClassifySpec, parse_spec
from orchestrator.ledger import JobState, JobStatus

app = typer.Typer(help="Dataset-scale Vision Transformer jobs on Celery + Redis.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
submit_app = typer.Typer(help="Validate, plan and enqueue a job; print its id.", no_args_is_help=True)
run_app = typer.Typer(help="Submit and wait with a progress bar (embedded stack when no broker is set).",
                      no_args_is_help=True)
app.add_typer(submit_app, name="submit")
app.add_typer(run_app, name="run")
console = Console()
err = Console(stderr=True)


def _help(spec_cls, name: str) -> str:
    return spec_cls.model_fields[name].description or ""


def _client(settings: Settings | None = None):
    from orchestrator.submit import Client

    return Client.from_settings(settings)


def _progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=err)


def _watch(client, job_id: str, n_items: int) -> JobStatus:
    with _progress_bar() as bar:
        task = bar.add_task(job_id, total=n_items, rate="0")

        def update(status: JobStatus) -> None:
            bar.update(task, completed=status.done, description=f"{job_id} {status.state.value}",
                       rate=f"{status.images_per_s:.1f}")

        return client.wait(job_id, on_update=update)


def _report(status: JobStatus, show_rows: int = 0, client=None) -> None:
    colour = "green" if status.state is JobState.SUCCEEDED else "red"
    console.print(f"[{colour}]{status.job_id}: {status.state.value}[/] - {status.done}/{status.n_items} items, "
                  f"{status.errors} error rows, {status.images_per_s:.1f} img/s")
    if status.reason:
        console.print(f"reason: {status.reason}")
    for shard, reason in sorted(status.failed_shards.items()):
        console.print(f"  shard {shard}: {reason}")
    console.print(f"results: {status.output}")
    if show_rows and status.state is JobState.SUCCEEDED:
        from orchestrator.results import read_table

        table = read_table(status.output, client.store, limit_parts=1).slice(0, show_rows).to_pylist()
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
            settings = stack.enter_context(EmbeddedStack(workers=workers, settings=settings)).settings
        client = _client(settings)
        job_id, plan = client.submit(spec, overwrite=overwrite)
        summary = plan.summary()
        err.print(f"job {job_id}: {summary['items']} images in {summary['shards']} shard(s)"
                  + (f", {summary['ignored_non_images']} non-image files ignored" if summary["ignored_non_images"] else "")
                  + (f", {summary['duplicate_keys']} duplicate keys dropped" if summary["duplicate_keys"] else ""))
        if not wait:
            console.print(job_id)
            return
        status = _watch(client, job_id, summary["items"])
        _report(status, show_rows, client)
    raise typer.Exit(_exit_code(status))


def _classify_command(group: typer.Typer, wait: bool) -> None:
    h = lambda name: _help(ClassifySpec, name)  # noqa: E731

    @group.command("classify", help=ClassifySpec.__doc__)
    def classify(
        input: str = typer.Option(..., "--input", "-i", help=h("input")),
        output: str = typer.Option(..., "--output", "-o", help=h("output")),
        model: str = typer.Option(..., "--model", "-m", help=h("model")),
        batch_size: int = typer.Option(64, help=h("batch_size")),
        shard_size: int = typer.Option(1000, help=h("shard_size")),
        precision: str = typer.Option("auto", help=h("precision")),
        top_k: int = typer.Option(5, help=h("top_k")),
        device: str = typer.Option("auto", help=h("device")),
        read_concurrency: int = typer.Option(16, help=h("read_concurrency")),
        overwrite: bool = typer.Option(False, help="Replace a finished job's output."),
        workers: int = typer.Option(1, help="Embedded stack only: local worker processes."),
    ) -> None:
        spec = parse_spec({
            "kind": "classify", "input": input, "output": output, "model": model, "batch_size": batch_size,
            "shard_size": shard_size, "precision": precision, "top_k": top_k, "device": device,
            "read_concurrency": read_concurrency,
        })
        _submit(spec, wait, workers, overwrite)


_classify_command(submit_app, wait=False)
_classify_command(run_app, wait=True)


@app.command()
def status(job_id: str, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show a job's state and totals."""
    job = _client().status(job_id)
    if as_json:
        console.print_json(json.dumps(job.to_json()))
    else:
        _report(job)
        console.print(f"shards: {job.shards}")


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
def jobs(limit: int = 20) -> None:
    """List recent jobs."""
    client = _client()
    for job_id in client.ledger.recent_jobs(limit):
        status = client.status(job_id)
        console.print(f"{job_id}  {status.kind:9} {status.state.value:22} {status.done}/{status.n_items}  {status.output}")


@app.command()
def schema() -> None:
    """Print the JSON schema of job specs."""
    console.print_json(json.dumps(ClassifySpec.model_json_schema()))


@app.command()
def worker(queues: str = typer.Option("vitbatch", help="Comma-separated queues to consume."),
           concurrency: int = typer.Option(1, help="Processes (prefork) or threads; 1 per GPU."),
           pool: str = typer.Option("solo", help="solo (default, one per GPU), threads or prefork."),
           name: str = typer.Option("vitbatch", help="Worker name; the host is appended.")) -> None:
    """Start a worker in the foreground (same as `celery -A workers worker`)."""
    from orchestrator.embedded import worker_command

    if not Settings().broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the jobs are submitted to")
    cmd = worker_command(name, queues, pool, concurrency)
    os.execv(cmd[0], cmd)


@app.command()
def flower(port: int = typer.Option(5555, help="HTTP port.")) -> None:
    """Start Flower with basic auth (VITBATCH_FLOWER_USER / VITBATCH_FLOWER_PASSWORD)."""
    from orchestrator.embedded import flower_command

    settings = Settings()
    if not settings.broker_url:
        raise VitbatchError("set VITBATCH_BROKER_URL to the Redis the workers use")
    cmd = flower_command(settings.broker_url, port, settings.flower_user, settings.flower_password)
    os.execv(cmd[0], cmd)


@app.command()
def up(workers: int = typer.Option(1, help="Local worker processes.")) -> None:
    """Run the embedded stack (Redis, workers, Flower) in the foreground until Ctrl-C."""
    from orchestrator.embedded import EmbeddedStack

    with EmbeddedStack(workers=workers, flower=True) as stack:
        s = stack.settings
        console.print(f"export VITBATCH_BROKER_URL='{s.broker_url}'")
        console.print(f"Flower: {stack.flower_url} (user {s.flower_user}, password {s.flower_password})")
        console.print("Ctrl-C stops the stack.")
        try:
            while not stack.dead_workers():
                time.sleep(1)
            err.print(f"worker(s) exited: {stack.dead_workers()}; see {stack.log_dir}")
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except VitbatchError as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
