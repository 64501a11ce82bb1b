"""The CLI's job commands: `submit`/`run` (one per job kind, options from the spec), and
`status`, `wait`, `cancel`, `retry`, `reconcile`, `recover`, `jobs`, `schema`."""

from __future__ import annotations

import inspect
import json
import os
import time
import types
import typing
from contextlib import ExitStack

import typer

from orchestrator.commands.terminal import EXIT_UNKNOWN_JOB, console, err, exit_code, report, watch
from orchestrator.config import Settings
from orchestrator.errors import JobNotFound, VitbatchError
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.kinds import KINDS, JobKind
from orchestrator.lifecycle.commits import stage_seconds
from orchestrator.lifecycle.states import JobState


def client_for(settings: Settings | None = None):
    """The control plane for these settings (default: the environment's, built here at the CLI's edge)."""
    from orchestrator.submission.submit import Client

    return Client.from_settings(settings or Settings())


def _submit(spec, wait: bool, workers: int, overwrite: bool, show_rows: int = 5) -> None:
    settings = Settings()
    embedded = wait and not settings.broker_url
    with ExitStack() as stack:
        if embedded:
            from orchestrator.stack.embedded import EmbeddedStack, auto_workers

            # A job that is one task (finetune, evaluate, export) keeps one worker busy: a second
            # would only compete with it for the cores while it starts.
            workers = workers or (1 if KINDS[spec.kind].unit == "single" else auto_workers())
            err.print(f"no VITBATCH_BROKER_URL: starting the embedded stack with {workers} worker(s)")
            embedded_stack = stack.enter_context(EmbeddedStack(workers=workers, settings=settings))
            settings = embedded_stack.settings
            for url in embedded_stack.metrics_urls:
                err.print(f"worker metrics: {url}")
        client = client_for(settings)
        stack.callback(client.close)  # before the embedded stack stops (the stack unwinds last in, first out)
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
            raise typer.Exit(0)
        status = watch(client, job_id, summary["items"], embedded_stack.stop_requested if embedded else None)
        if embedded and status.state is JobState.SUCCEEDED:
            embedded_stack.discard()  # nothing the stack holds is needed any more
        elif embedded:
            embedded_stack.begin_shutdown()  # warm: a cancelled job may have a shard still running
        report(status, show_rows, client)
    raise typer.Exit(exit_code(status))


def _cli_type(annotation, default):
    """The type typer parses for a spec field: lists, literals and JSON objects arrive as text."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal or origin is list or annotation is dict or origin is dict:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.Optional[_cli_type(inner[0], default)]  # noqa: UP045 (typer reads typing.Optional)
    return annotation


def _json_argument(value: str) -> str:
    """A JSON option as typed, or the text of FILE for `@FILE` (a long --config is easier in a file)."""
    if not value.startswith("@"):
        return value
    try:
        with open(os.path.expanduser(value[1:]), encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise VitbatchError(f"cannot read {value[1:]!r} for --config ({e.strerror}): give a JSON object or @file.json") from e


def _job_command(group: typer.Typer, job_kind: JobKind, wait: bool) -> None:
    """One command per job kind, its options generated from the spec's fields and descriptions."""
    kind, spec_cls = job_kind.name, job_kind.spec
    params = []
    for name, field in spec_cls.model_fields.items():
        if name == "kind":
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(v) for v in default)
        flag = "--" + name.replace("_", "-")
        if _cli_type(field.annotation, default) in (bool, typing.Optional[bool]):  # noqa: UP045
            flag += "/--no-" + name.replace("_", "-")  # a default of None (auto) stays None unless one is given
        option = typer.Option(... if field.is_required() else default, flag, help=field.description)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_cli_type(field.annotation, default)))
    params.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, help="Replace a finished job's output.")))
    params.append(inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                                    default=typer.Option(0, help="Embedded stack only: local worker processes (0: one "
                                                        "per CPU core up to 4, or 1 on a GPU host or for a job "
                                                        "that is one task).")))

    def command(**kwargs) -> None:
        overwrite, workers = kwargs.pop("overwrite"), kwargs.pop("workers")
        if isinstance(kwargs.get("config"), str):
            kwargs["config"] = _json_argument(kwargs["config"])
        spec = parse_spec({"kind": kind, **{k: v for k, v in kwargs.items() if v is not None}})
        _submit(spec, wait, workers, overwrite, show_rows=job_kind.rows_shown)

    # typer reads the options from the signature: this one is built from the spec's fields at runtime
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = spec_cls.__doc__
    group.command(kind)(command)


def add_job_commands(group: typer.Typer, wait: bool) -> None:
    """`submit <kind>` (wait=False) or `run <kind>` (wait=True) for every job kind."""
    for kind in KINDS.values():
        _job_command(group, kind, wait)


def _unknown(error: JobNotFound) -> typer.Exit:
    """The job is not in Redis (never was, expired, or Redis lost its data): say so, exit 3."""
    err.print(f"unknown job: {error}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_UNKNOWN_JOB)


def status(job_id: str, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show a job's state and totals (exit 3 when Redis does not know the job)."""
    from orchestrator.fleet.redisretry import ride_out

    client = client_for()
    try:
        job, stages = ride_out(lambda: (client.status(job_id), stage_seconds(client.ledger.shard_stats(job_id).values())),
                               client.settings.redis_retry_s, counted=client.ledger.count_oom_refusals)
    except JobNotFound as e:
        raise _unknown(e) from None
    if as_json:
        console.print_json(json.dumps({**job.to_json(), "stage_seconds": stages}))
    else:
        report(job)
        console.print(f"shards: {job.shards}")
        if stages:
            console.print("seconds per stage (summed over committed shards): "
                          + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in stages.items()))


def wait(job_id: str) -> None:
    """Wait with a progress bar; exit 0 when the job succeeded, 1 otherwise, 3 when Redis does not know the job."""
    from orchestrator.fleet.redisretry import ride_out

    client = client_for()
    try:
        final = watch(client, job_id, ride_out(lambda: client.status(job_id).n_items, client.settings.redis_retry_s,
                                               counted=client.ledger.count_oom_refusals))
    except JobNotFound as e:
        raise _unknown(e) from None
    report(final)
    raise typer.Exit(exit_code(final))


def cancel(job_id: str) -> None:
    """Cancel a job: queued shards are skipped, running shards stop at their next batch."""
    report(client_for().cancel(job_id))


def retry(job_id: str) -> None:
    """Re-enqueue only the shards that failed or never committed."""
    shards = client_for().retry(job_id)
    console.print(f"re-enqueued {len(shards)} shard(s): {shards}")


def reconcile(loop: bool = typer.Option(False, help="Keep reconciling until Ctrl-C."),
              stale_after_s: float = typer.Option(None, help="Override VITBATCH_STALE_AFTER_S.")) -> None:
    """Re-enqueue shards whose worker went silent or stalled; finalize jobs whose last worker died.

    Safe to run several at once. With --loop, a job that cannot be reconciled is reported and
    passed over, and a Redis restart is ridden out for VITBATCH_REDIS_RETRY_S."""
    from orchestrator.fleet.redisretry import ride_out
    from orchestrator.lifecycle.reconcile import reconcile as reconcile_once

    client = client_for()
    stale = stale_after_s or client.settings.stale_after_s
    while True:
        result = ride_out(lambda: reconcile_once(client, stale), client.settings.redis_retry_s,
                          counted=client.ledger.count_oom_refusals)
        for job_id, shards in result.requeued.items():
            console.print(f"{job_id}: re-enqueued silent shards {shards}")
        for job_id in result.finalized:
            console.print(f"{job_id}: finalized")
        for job_id, error in result.errors.items():
            err.print(f"{job_id}: could not reconcile ({error})", markup=False, highlight=False, soft_wrap=True)
        for job_id in result.failed:
            console.print(f"{job_id}: marked failed after {client.settings.reconcile_max_errors} failed passes")
        for job_id in result.unknown:
            err.print(f"{job_id}: no longer in Redis; left alone (`vitbatch recover <output>` rebuilds it)")
        if not loop:
            return
        time.sleep(client.settings.heartbeat_s)


def recover(output: str = typer.Argument(..., help="The lost job's output prefix."),
            job_id: str = typer.Option(None, help="The job to recover (default: the one the prefix's _job.json names).")
            ) -> None:
    """Rebuild a job Redis lost (emptied, or a new instance) from its output's records and run the rest.

    Committed shards (their commit markers) count as done; the others are enqueued again."""
    from orchestrator.lifecycle.recover import recover as recover_job

    done = recover_job(client_for(), output, job_id)
    console.print(f"{done.job_id}: recovered {done.kind} job at {done.output}: {len(done.committed)} committed "
                  f"shard(s) kept, {len(done.enqueued)} enqueued again {done.enqueued}"
                  + (f", {done.carried} carried-over rows" if done.carried else ""))
    console.print(f"follow it with `vitbatch wait {done.job_id}`")


def jobs(limit: int = 20) -> None:
    """List recent jobs."""
    client = client_for()
    for job_id in client.ledger.recent_jobs(limit):
        job = client.status(job_id)
        console.print(f"{job_id}  {job.kind:9} {job.state.value:22} {job.done}/{job.n_items}  {job.output}")


def report_page(output: str = typer.Argument(..., help="An output prefix (local or s3://) with a succeeded job."),
                open_page: bool = typer.Option(False, "--open", help="Open the page in a browser afterwards."),
                seed: int = typer.Option(0, help="Seed of the sampled rows (the same seed, the same page).")) -> None:
    """Write the page of the output's latest succeeded job (<output>/_report.html) and print where it is."""
    from orchestrator.published.report import write_report
    from orchestrator.store.storage import ObjectStore

    uri = write_report(output, ObjectStore(Settings()), seed)
    typer.echo(uri)  # plain: a path a script can take (rich would wrap it)
    if open_page:
        import webbrowser

        webbrowser.open(uri)


def schema() -> None:
    """Print the JSON schema of job specs."""
    from orchestrator.jobspec.kinds import spec_schema

    console.print_json(json.dumps(spec_schema()))
