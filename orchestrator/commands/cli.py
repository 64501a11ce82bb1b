"""`vitbatch`: submit, run, watch and serve jobs (typer + rich).

The commands live in rooms by group (cli_jobs, cli_schedules, cli_services, demo); this
file lists them in the order `vitbatch --help` shows, and turns errors into one line.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape as rich_escape

from orchestrator.commands import cli_jobs, cli_schedules, cli_services
from orchestrator.commands.terminal import err
from orchestrator.errors import VitbatchError

app = typer.Typer(help="Dataset-scale Vision Transformer jobs on Celery + Redis.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
submit_app = typer.Typer(help="Validate, plan and enqueue a job; print its id.", no_args_is_help=True)
run_app = typer.Typer(help="Submit and wait with a progress bar (embedded stack when no broker is set).",
                      no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduled jobs (nightly reclassification) from a TOML file.", no_args_is_help=True)
app.add_typer(submit_app, name="submit")
app.add_typer(run_app, name="run")
app.add_typer(schedule_app, name="schedule")
cli_jobs.add_job_commands(submit_app, wait=False)
cli_jobs.add_job_commands(run_app, wait=True)
schedule_app.command("check")(cli_schedules.schedule_check)
schedule_app.command("run")(cli_schedules.schedule_run)
app.command("report")(cli_jobs.report_page)


def demo(workdir: str = typer.Option("vitbatch-demo", help="Where images, model and results go."),
         workers: int = typer.Option(2, help="Local worker processes of the embedded stack."),
         quick: bool = typer.Option(False, "--quick", help="Fine-tune for one epoch only, then classify (under a minute).")) -> None:
    """The offline demo: fine-tune a ViT on scikit-learn's digits through the queue, then use it."""
    from orchestrator.stack.demo import run_demo

    run_demo(workdir, workers, quick)


for _command in (cli_jobs.status, cli_jobs.wait, cli_jobs.cancel, cli_jobs.retry, cli_jobs.reconcile, cli_jobs.recover,
                 cli_jobs.jobs,
                 cli_schedules.runs, cli_schedules.beat, cli_jobs.schema, cli_services.worker, cli_services.flower,
                 cli_services.metrics, cli_services.up, demo):
    app.command()(_command)


def _unreachable(error: BaseException) -> str | None:
    """One line for a Redis, broker or S3 connection failure, or None for any other exception.

    Matched by class module and name, so that this runs without importing botocore; the
    messages of these errors name host and port, never the password in the broker URL.
    """
    for cls in type(error).__mro__:
        module, name = cls.__module__.split(".")[0], cls.__name__
        if module == "redis" and name in ("ConnectionError", "TimeoutError", "AuthenticationError", "BusyLoadingError"):
            return f"cannot reach Redis ({error}): is it running, and is VITBATCH_BROKER_URL right?"
        if module == "redis" and name == "OutOfMemoryError":
            return f"Redis is out of memory and refuses writes ({error}): raise its maxmemory or free memory"
        if module == "kombu" and name == "OperationalError":
            return f"cannot reach the broker ({error}): is Redis running, and is VITBATCH_BROKER_URL right?"
        if module == "botocore" and name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                             "NoCredentialsError", "ConnectionClosedError"):
            return f"cannot reach S3 ({error}): check VITBATCH_S3_ENDPOINT_URL and the AWS_* credentials"
    return None


def main(argv: list[str] | None = None) -> None:
    """The `vitbatch` command. As the process itself (no `argv`), it ends through clientexit.leave:
    stopped, flushed, then gone without the interpreter's teardown (see there why)."""
    if argv is not None:
        _main(argv)
        return
    try:
        _main(None)
    except SystemExit as e:
        from orchestrator.fleet.clientexit import exit_code, leave

        leave(exit_code(e.code))


def _main(argv: list[str] | None) -> None:
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
