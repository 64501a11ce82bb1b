"""The CLI's schedule commands: `schedule check`, `schedule run`, `runs` and `beat`."""

from __future__ import annotations

import json
from datetime import UTC

import typer
from rich.table import Table

from orchestrator.commands.cli_jobs import client_for
from orchestrator.commands.terminal import console, err
from orchestrator.config import Settings
from orchestrator.errors import VitbatchError

_FILE = typer.Option(..., "--file", "-f", help="Schedules TOML file.")


def schedule_check(file: str = _FILE) -> None:
    """Validate a schedules file and show when each entry runs next."""
    from datetime import datetime

    from orchestrator.submission.schedule import load_schedules

    for entry in load_schedules(file):
        wait_s = entry.crontab().remaining_estimate(datetime.now(UTC)).total_seconds()
        console.print(f"{entry.name}: '{entry.cron}' {entry.timezone}, {entry.job['kind']} -> "
                      f"{entry.job['output']}, next run in {max(wait_s, 0) / 3600:.1f} h")


def schedule_run(name: str, file: str = _FILE) -> None:
    """Start one run of a schedule now (what beat does on time); print the run record."""
    from orchestrator.submission.schedule import load_schedules, start_run

    entries = {e.name: e for e in load_schedules(file)}
    if name not in entries:
        raise VitbatchError(f"no schedule {name!r} in {file}; it has {sorted(entries)}")
    console.print_json(json.dumps(start_run(client_for(), entries[name])))


def runs(name: str, limit: int = 20, as_json: bool = typer.Option(False, "--json")) -> None:
    """List past runs of a schedule: changed/unchanged/failed counts and images/s."""
    from orchestrator.submission.schedule import runs as list_runs

    records = list_runs(client_for(), name, limit)
    if as_json:
        console.print_json(json.dumps(records))
        return
    view = Table("run", "job", "state", "computed", "carried over", "errors", "img/s", "output")
    for r in records:
        view.add_row(r["run_id"], r["job_id"], r["state"], str(r["processed"]), str(r["carried"]),
                     str(r["errors"]), str(r["images_per_s"]), r["output"])
    console.print(view)


def beat(file: str = _FILE,
         state_dir: str = typer.Option("~/.cache/vitbatch/beat", help="Where beat keeps its last-run times.")) -> None:
    """Run Celery beat with the schedules in FILE (one beat per deployment)."""
    from pathlib import Path

    from orchestrator.fleet.celery_app import make_app
    from orchestrator.submission.schedule import beat_schedule, load_schedules

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
