"""Submit, watch, cancel and retry jobs. Everything is checked before anything is enqueued."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from orchestrator.config import Settings
from orchestrator.constants import (
    JOB_SPEC_FILE,
    QUEUE_DEFAULT,
    QUEUE_INTERACTIVE,
    SUCCESS_FILE,
)
from orchestrator.errors import BrokerUnavailable, ObjectExists, OutputBusy, SpecError
from orchestrator.fleet.celery_app import make_app
from orchestrator.fleet.redisretry import ride_out
from orchestrator.inputs.planner import Plan
from orchestrator.jobspec.checks.outputs import check_prefix_free
from orchestrator.jobspec.jobs import JobSpec
from orchestrator.jobspec.kinds import JobKind, Planned, job_kind
from orchestrator.jobspec.modelrefs import normalize_model_ref, resolve_alias
from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.lifecycle.states import JobState, JobStatus, ShardState
from orchestrator.published.outputs import job_dir, new_job_id
from orchestrator.published.results import read_record
from orchestrator.store.storage import ObjectStore, join
from orchestrator.submission.enqueue import send_units
from orchestrator.submission.incremental import carry_over, submitted_job

log = logging.getLogger(__name__)


@dataclass
class Client:
    """The control plane as one object: settings, the Celery app, the ledger and the store."""

    settings: Settings
    app: Celery
    ledger: Ledger
    store: ObjectStore

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        if not settings.broker_url:
            raise BrokerUnavailable("no broker configured: set VITBATCH_BROKER_URL or use `vitbatch run`")
        return cls(settings, make_app(settings), Ledger.from_settings(settings),
                   ObjectStore(settings))

    def close(self) -> None:
        """Close the Celery app's broker pools and the ledger's Redis connections (the CLI's exit)."""
        self.app.close()
        self.ledger.r.close()

    # -- submit ----------------------------------------------------------------------------
    def submit(self, spec: JobSpec, overwrite: bool = False, previous_output: str | None = None,
               lane: str | None = None) -> tuple[str, dict]:
        """Check, plan by the kind, hold the output prefix, record and enqueue; returns the job id and the
        plan's summary. The same line for every kind: what differs is the kind's plan (kinds.py, plans.py).

        Nothing is written before every check has passed and the prefix is this job's.
        `previous_output`: a committed run of the same job whose unchanged rows are carried over.
        """
        self.ledger.ping()
        spec, alias = self._followed(spec)
        kind = job_kind(spec.kind)
        check_prefix_free(spec, self.store, overwrite)
        planned = kind.planned(spec, self.store)
        job_id = new_job_id()
        self.ledger.hold_output(spec.output, job_id)
        try:
            summary = self._record(job_id, spec, kind, planned, alias, previous_output)
        except BaseException:
            self._abandon(job_id, spec.output)
            raise
        self._start(job_id, kind, planned, lane or self.queue_for(spec, planned.n_shards))
        return job_id, summary

    def _followed(self, spec: JobSpec) -> tuple[JobSpec, str | None]:
        """The spec with its `--model alias:<uri>` followed to the model it names now, and the alias."""
        model = getattr(spec, "model", None)  # vector jobs have none; a job from scratch leaves it unset
        alias = model if model and model.startswith("alias:") else None
        if alias:
            spec = spec.model_copy(update={"model": normalize_model_ref(resolve_alias(alias, self.store))})
        return spec, alias

    def _record(self, job_id: str, spec: JobSpec, kind: JobKind, planned: Planned, alias: str | None,
                previous_output: str | None) -> dict:
        """Write the job's folder (carried rows, what the plan writes, its record), the prefix's record, then
        the ledger entry; returns the plan's summary as recorded."""
        folder = job_dir(spec.output, job_id)
        carried = 0
        if previous_output and kind.carries_over and isinstance(planned, Plan) and planned.model_identity:
            carried = carry_over(planned, previous_output, folder, planned.model_identity, self.store, job_id)
        planned.write(folder, self.store)
        summary = {**planned.summary(), "carried": carried} if kind.runs_shards else planned.summary()
        record = submitted_job(job_id, spec, summary, self.store, model_alias=alias,
                               identity=planned.model_identity).to_bytes()
        self.store.write(join(folder, JOB_SPEC_FILE), record)
        self._take_prefix_record(spec.output, record)
        self.ledger.create(job_id, spec.model_dump_json(), spec.kind, spec.output, summary["items"],
                           planned.n_shards, carried=carried)
        return summary

    def _start(self, job_id: str, kind: JobKind, planned: Planned, queue: str) -> None:
        """Enqueue the plan's first units; a job whose rows were all carried over is finished at once.
        A send that fails cancels the job: shards already sent see it cancelled and do nothing."""
        if not planned.n_shards:
            finalize(job_id, self.ledger, self.store)
        else:
            try:
                self.enqueue(job_id, planned.first(), kind.name, queue)
            except Exception as e:
                self._safe_cancel(job_id, f"enqueue failed: {e}")
                raise BrokerUnavailable(f"enqueueing job {job_id} failed ({e}); the job was cancelled") from e

    def _take_prefix_record(self, output: str, record: bytes) -> None:
        """`_job.json` at the prefix names its holder; a first job creates it create-only, so two
        deployments with different Redis servers cannot both take a fresh prefix."""
        uri = join(output, JOB_SPEC_FILE)
        try:
            self.store.write(uri, record, if_absent=not self.store.exists(uri))
        except ObjectExists as e:
            raise OutputBusy(f"another job took {output} at the same moment ({e}); nothing of this job is "
                             "visible there: choose another output or retry with --overwrite") from e

    def _abandon(self, job_id: str, output: str) -> None:
        """A submit that broke after taking the prefix: free it; its folder is invisible and removed."""
        try:
            self.ledger.release_output(output, job_id)
            self.store.delete_prefix(job_dir(output, job_id))
        except Exception:
            log.warning("could not clean up abandoned job %s at %s", job_id, output, exc_info=True)

    def queue_for(self, spec: JobSpec, n_units: int) -> str:
        """The kind's own queue, else the spec's lane (auto: interactive for a job of few units)."""
        lane = getattr(spec, "lane", "auto")
        if lane == "auto":
            lane = "interactive" if n_units <= self.settings.interactive_max_shards else "bulk"
        return job_kind(spec.kind).queue or (QUEUE_INTERACTIVE if lane == "interactive" else QUEUE_DEFAULT)

    def enqueue(self, job_id: str, shards, kind: str | None = None, queue: str | None = None) -> None:
        """Send one task per shard; `queue` defaults to the lane the job was submitted to."""
        kind = kind or self.ledger.status(job_id).kind
        queue = queue or self.ledger.queue(job_id)
        self.ledger.set_queue(job_id, queue)
        send_units(self.app, self.ledger, job_id, kind, shards, queue)

    def _safe_cancel(self, job_id: str, reason: str) -> None:
        try:
            self.ledger.set_state(job_id, JobState.CANCELLED, reason)
        except Exception:
            pass  # Redis is down: the job was never acknowledged to the user anyway

    # -- watch -----------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        return self.ledger.status(job_id)

    def wait(self, job_id: str, on_update: Callable[[JobStatus], None] | None = None,
             poll_s: float = 0.5, timeout_s: float | None = None, stop: threading.Event | None = None) -> JobStatus:
        """The job's status once it is terminal. KeyboardInterrupt within a poll once `stop` is set
        (the embedded stack's SIGTERM, should its own interrupt have been lost). A Redis restart is
        ridden out for up to `VITBATCH_REDIS_RETRY_S` per outage, as is Redis refusing writes at maxmemory
        (redisretry.py). JobNotFound when Redis does not know the job, or loses it meanwhile."""
        from orchestrator.lifecycle.reconcile import reconcile

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_reconcile = time.monotonic() + self.settings.heartbeat_s

        def read() -> JobStatus:
            nonlocal next_reconcile
            if time.monotonic() >= next_reconcile:  # waiting clients double as reconcilers
                reconcile(self, self.settings.stale_after_s, [job_id])
                next_reconcile = time.monotonic() + self.settings.heartbeat_s
            return self.status(job_id)

        with self.ledger.state_changes(job_id) as pause:  # the end is seen when it is recorded, not a poll later
            while True:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                status = ride_out(read, self.settings.redis_retry_s, counted=self.ledger.count_oom_refusals)
                if on_update:
                    on_update(status)
                if status.state.terminal:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {status.state.value} after {timeout_s} s")
                pause(poll_s)

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a live job (an ended one, or one being published, stays as it is)."""
        self.ledger.set_state(job_id, JobState.CANCELLED, "cancelled by user")
        return self.status(job_id)

    def retry(self, job_id: str) -> list[int]:
        """Re-enqueue only the shards that failed or never committed (all of them after a cancel).

        The job takes its output prefix back first: OutputBusy when another job holds it now,
        SpecError when a later job has replaced its output.
        """
        status = self.status(job_id)
        record = read_record(self.store, join(status.output, SUCCESS_FILE))
        if record is not None and record.job_id not in ("", job_id) and record.finished_at > status.created_at:
            raise SpecError(f"job {job_id} was replaced at {status.output} by job {record.job_id}: "
                            "submit it again instead")
        self.ledger.hold_output(status.output, job_id)
        states = self.ledger.shard_states(job_id)
        beats = self.ledger.heartbeats(job_id)
        silent_since = self.ledger.now() - self.settings.stale_after_s  # beats are stamped by Redis's clock
        cancelled = status.state is JobState.CANCELLED
        todo = sorted(i for i, s in states.items() if s in (ShardState.FAILED, ShardState.PENDING)
                      or (s is ShardState.RUNNING and (cancelled or beats.get(i, 0) < silent_since)))
        if not todo:
            if status.state.terminal:
                self.ledger.release_output(status.output, job_id)
            return []
        self.ledger.reset_shards(job_id, todo)
        self.enqueue(job_id, todo)
        return todo
