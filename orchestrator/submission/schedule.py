"""Scheduled jobs (nightly reclassification): a TOML file of cron entries run by Celery beat.

    [[schedule]]
    name = "nightly-products"
    cron = "0 2 * * *"               # minute hour day-of-month month day-of-week
    timezone = "Europe/Berlin"
    incremental = true               # recompute only changed images (or everything after a model change)
    [schedule.job]
    kind = "classify"
    input = "s3://bucket/products/"
    output = "s3://bucket/nightly/products/"   # each run writes <output>/<run id>/ (see new_run_id)
    model = "alias:s3://bucket/models/latest"  # a pointer a finetune job (--alias) updates

Beat only sends `vitbatch.scheduled_run(name, entry)` on time; a worker runs it, which
plans (incrementally) and submits the job on the bulk lane, and records the run.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.constants import (
    QUEUE_DEFAULT,
    SCHEDULE_RUNS_KEPT,
    SUCCESS_FILE,
    TASK_SCHEDULED_RUN,
    schedule_runs_key,
)
from orchestrator.errors import JobNotFound, SpecError, StorageError
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.commits import JobRecord
from orchestrator.published.results import read_record
from orchestrator.store.storage import join

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ZonedCrontab(crontab):
    """A crontab evaluated in its own timezone (Celery's crontab uses the app's)."""

    def __init__(self, expression: str, timezone: str) -> None:
        minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
        super().__init__(minute, hour, day_of_week, day_of_month, month_of_year)
        self.expression, self.timezone = expression, timezone
        self.__dict__["tz"] = ZoneInfo(timezone)  # overrides the cached property

    def __reduce__(self):
        return self.__class__, (self.expression, self.timezone)


def _parsed(value: str, parse, errors: tuple[type[Exception], ...], problem) -> str:
    """`value` when `parse` takes it; else the field error `problem(e)` (pydantic wants a ValueError)."""
    try:
        parse(value)
    except errors as e:
        raise ValueError(problem(e)) from e
    return value


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Lowercase letters, digits and dashes; names the run history.")
    cron: str = Field(description="Five-field cron expression: minute hour day-of-month month day-of-week.")
    timezone: str = Field("UTC", description="IANA timezone the cron expression is read in.")
    incremental: bool = Field(True, description="Carry unchanged items over from the previous committed run.")
    job: dict = Field(description="A job spec (as for `vitbatch submit`); its output is the root of the runs.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"schedule name {value!r}: use lowercase letters, digits and dashes")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"cron {value!r} needs five fields: minute hour day-of-month month day-of-week")
        return _parsed(value, lambda v: ZonedCrontab(v, "UTC"), (ValueError, IndexError),
                       lambda e: f"cron {value!r}: {e}")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        return _parsed(value, ZoneInfo, (ZoneInfoNotFoundError, ValueError), lambda e: f"unknown timezone {value!r}")

    @field_validator("job")
    @classmethod
    def _job(cls, value: dict) -> dict:
        parse_spec(value)  # refuse a bad spec when the file is loaded, not at 2 a.m.
        return value

    def crontab(self) -> ZonedCrontab:
        return ZonedCrontab(self.cron, self.timezone)


def load_schedules(path: str | Path) -> list[ScheduleEntry]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"schedule file {path}: {e}") from e
    try:
        entries = [ScheduleEntry(**raw) for raw in data.get("schedule", [])]
    except (ValueError, TypeError, SpecError) as e:
        raise SpecError(f"schedule file {path}: {e}") from e
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SpecError(f"schedule file {path}: duplicate schedule names")
    return entries


def beat_schedule(entries: list[ScheduleEntry]) -> dict:
    return {e.name: {"task": TASK_SCHEDULED_RUN, "schedule": e.crontab(), "args": [e.name, e.model_dump()],
                     "options": {"queue": QUEUE_DEFAULT}} for e in entries}


def new_run_id(now: float) -> str:
    """A run's folder name, e.g. `20261126T010000.123456Z-3f9a1c`: the start time in UTC to the
    microsecond, then 24 random bits. Two runs of one schedule (beat and `schedule run`, or two
    manual runs) may start within the same second, and must never share an output prefix; the
    names still sort by start time, across DST changes too (UTC, fixed width)."""
    started = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{started}-{secrets.token_hex(3)}"


def start_run(client, entry: ScheduleEntry, now: float | None = None) -> dict:
    """Submit one run of a schedule (incremental from the last succeeded run) and record it."""
    now = now or time.time()
    run_id = new_run_id(now)
    spec = parse_spec({**entry.job, "output": join(parse_spec(entry.job).output, run_id), "lane": "bulk"})
    previous = last_succeeded(client, entry.name) if entry.incremental else None
    job_id, plan = client.submit(spec, previous_output=previous["output"] if previous else None)
    run = {"run_id": run_id, "job_id": job_id, "output": spec.output, "started_at": now,
           "previous": previous["run_id"] if previous else None, "carried": plan.get("carried", 0),
           "to_compute": plan["items"]}
    pipe = client.ledger.r.pipeline(transaction=True)
    pipe.lpush(schedule_runs_key(entry.name), json.dumps(run))
    pipe.ltrim(schedule_runs_key(entry.name), 0, SCHEDULE_RUNS_KEPT - 1)  # Redis does not grow for ever
    pipe.execute()
    return run


def runs(client, name: str, limit: int = 20) -> list[dict]:
    """Past runs, newest first, with their state and, when finished, their output's record (under
    `summary`, the key `vitbatch runs --json` has always shown it under)."""
    out = []
    for raw in client.ledger.r.lrange(schedule_runs_key(name), 0, limit - 1):
        run = json.loads(raw)
        published = published_record(client, run["output"])
        if published is not None:
            run["summary"] = published.to_json()
        try:
            status = client.ledger.status(run["job_id"])
            run.update(state=status.state.value, processed=status.done, errors=status.errors,
                       images_per_s=round(status.images_per_s, 2))
        except JobNotFound:  # its Redis state expired (VITBATCH_JOB_TTL_S): the output's record remains
            run.update(state="succeeded" if published is not None and published.job_id == run["job_id"]
                       else "expired")
        out.append(run)
    return out


def published_record(client, output: str) -> JobRecord | None:
    """The record of the succeeded job at a run's output; None before it succeeds (or when unreadable)."""
    try:
        return read_record(client.store, join(output, SUCCESS_FILE))
    except StorageError:
        return None


def last_succeeded(client, name: str) -> dict | None:
    for run in runs(client, name, limit=50):
        if run["state"] == "succeeded":
            return run
    return None
