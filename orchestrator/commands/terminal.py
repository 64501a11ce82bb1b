"""What the CLI shows on the terminal: progress bars while a job runs, and a job's report."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from orchestrator.lifecycle.states import JobState, JobStatus

console = Console()
err = Console(stderr=True)


def eta_text(eta_s: float | None) -> str:
    """The job's ETA as h:mm:ss ("?" before the first item: no rate yet)."""
    if eta_s is None:
        return "?"
    minutes, seconds = divmod(int(round(eta_s)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def _progress_bar() -> Progress:
    # The ETA is the ledger's (JobStatus.eta_s, the job's whole rate), the same that `status` prints.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s, ETA {task.fields[eta]}"), console=err)


def watch(client, job_id: str, n_items: int, stop: threading.Event | None = None) -> JobStatus:
    """Wait for the job with a progress bar on stderr; its final status (`stop`: as Client.wait's)."""
    with _progress_bar() as bar:
        task = bar.add_task(job_id, total=n_items, rate="0", eta="?")

        def update(status: JobStatus) -> None:
            # The total moves after submit (tars expand into their members, skipped training images):
            # the ledger's is the truth.
            bar.update(task, completed=status.done, total=status.n_items or n_items,
                       description=f"{job_id} {status.state.value}",
                       rate=f"{status.images_per_s:.1f}", eta=eta_text(status.eta_s))

        return client.wait(job_id, on_update=update, stop=stop)


def report(status: JobStatus, show_rows: int = 0, client=None) -> None:
    """State, totals, failed shards and where the results are; the first rows of a succeeded classify."""
    colour = "green" if status.state is JobState.SUCCEEDED else "red"
    console.print(f"[{colour}]{status.job_id}: {status.state.value}[/] - {status.done}/{status.n_items} items, "
                  f"{status.errors} error rows, {status.images_per_s:.1f} img/s"
                  + ("" if status.state.terminal else f", ETA {eta_text(status.eta_s)}"))
    if status.reason:
        console.print(f"reason: {status.reason}")
    for shard, reason in sorted(status.failed_shards.items()):
        console.print(f"  shard {shard}: {reason}")
    if status.requeued:
        console.print(f"reconciler re-enqueued {status.requeued} silent shard(s)")
    console.print(f"results: {status.output}")
    if show_rows and status.state is JobState.SUCCEEDED:
        from orchestrator.published.results import read_table

        table = read_table(status.output, client.store, limit_parts=1, job_id=status.job_id)
        table = table.slice(0, show_rows).to_pylist()
        view = Table("key", "label", "score", "error")
        for row in table:
            score = "" if row["score"] is None else f"{row['score']:.3f}"
            view.add_row(row["key"], str(row["label"] or ""), score, row["error"] or "")
        console.print(view)


EXIT_UNKNOWN_JOB = 3  # `status`/`wait`: Redis does not know the job (0: succeeded, 1: ended otherwise, 2: error)


def exit_code(status: JobStatus) -> int:
    return 0 if status.state is JobState.SUCCEEDED else 1
