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
from orchestrator.inputs.manifest import write_manifests
from orchestrator.inputs.planner import Plan, plan_job
from orchestrator.inputs.vectorplan import plan_vectors
from orchestrator.jobspec.checks.models import check_export, check_model_options
from orchestrator.jobspec.checks.outputs import check_prefix_free
from orchestrator.jobspec.jobs import (
    DedupSpec,
    EvaluateSpec,
    ExportSpec,
    FinetuneSpec,
    InferenceSpec,
    JobSpec,
    NeighborsSpec,
    normalize_model_ref,
)
from orchestrator.jobspec.kinds import job_kind
from orchestrator.jobspec.modelrefs import model_identity, read_config, resolve_alias
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
    def check(self, spec: InferenceSpec, overwrite: bool = False) -> Plan:
        """Every check that does not need a GPU; SpecError on the first problem."""
        config = read_config(spec.model, self.store)
        check_model_options(spec, config)  # layers, top_k, architecture, remote code
        check_prefix_free(spec, self.store, overwrite)
        return plan_job(spec, self.store)

    def submit(self, spec: JobSpec, overwrite: bool = False, previous_output: str | None = None,
               lane: str | None = None) -> tuple[str, dict]:
        """Check, take the output prefix, plan, record and enqueue; returns the job id and the plan's summary.

        Nothing is written before every check has passed and the prefix is this job's.
        `previous_output`: a committed run of the same job whose unchanged rows are carried over.
        """
        self.ledger.ping()
        extra: dict = {}
        model = getattr(spec, "model", None)  # vector jobs have none; a job from scratch leaves it unset
        if model and model.startswith("alias:"):
            extra["model_alias"] = model
            spec = spec.model_copy(update={"model": normalize_model_ref(resolve_alias(model, self.store))})
        job_plan, vector_plan = None, None
        if isinstance(spec, DedupSpec | NeighborsSpec):  # an embed job's vectors, in phases
            check_prefix_free(spec, self.store, overwrite)
            vector_plan = plan_vectors(spec, self.store)
            summary, n_units = vector_plan.summary(), vector_plan.n_shards
        elif isinstance(spec, ExportSpec):  # a single task, as are finetune and evaluate
            check_prefix_free(spec, self.store, overwrite)
            summary, n_units = check_export(spec, self.store), 1
        elif isinstance(spec, FinetuneSpec | EvaluateSpec):
            from orchestrator.jobspec.checks.training import check_labeled

            check_prefix_free(spec, self.store, overwrite)
            summary, n_units = check_labeled(spec, self.store), 1
        else:
            job_plan = self.check(spec, overwrite)
            extra["model_identity"] = model_identity(spec.model, self.store)
            summary, n_units = job_plan.summary(), job_plan.n_shards
        job_id = new_job_id()
        self.ledger.hold_output(spec.output, job_id)
        try:
            if vector_plan is not None:
                vector_plan.write(job_dir(spec.output, job_id), self.store)
            summary, n_units = self._record(job_id, spec, job_plan, summary, n_units, extra, previous_output)
        except BaseException:
            self._abandon(job_id, spec.output)
            raise
        if n_units == 0:  # everything carried over: nothing to enqueue
            finalize(job_id, self.ledger, self.store)
            return job_id, summary
        try:
            first = vector_plan.first() if vector_plan is not None else range(n_units)  # later phases follow
            self.enqueue(job_id, first, spec.kind, lane or self.queue_for(spec, n_units))
        except Exception as e:
            # Shards already sent see a cancelled job and do nothing: no half-run job.
            self._safe_cancel(job_id, f"enqueue failed: {e}")
            raise BrokerUnavailable(f"enqueueing job {job_id} failed ({e}); the job was cancelled") from e
        return job_id, summary

    def _record(self, job_id: str, spec: JobSpec, job_plan: Plan | None, summary: dict, n_units: int,
                extra: dict, previous_output: str | None) -> tuple[dict, int]:
        """Write the job's folder (carried rows, manifests, its record), then the ledger entry."""
        folder = job_dir(spec.output, job_id)
        if job_plan is not None:
            carried = 0
            if previous_output and job_kind(spec.kind).carries_over:
                carried = carry_over(job_plan, previous_output, folder, extra["model_identity"], self.store, job_id)
            write_manifests(job_plan, folder, self.store)
            summary, n_units = {**job_plan.summary(), "carried": carried}, job_plan.n_shards
        spec_json = spec.model_dump_json()
        record = submitted_job(job_id, spec, summary, self.store, model_alias=extra.get("model_alias"),
                               identity=extra.get("model_identity")).to_bytes()
        self.store.write(join(folder, JOB_SPEC_FILE), record)
        self._take_prefix_record(spec.output, record)
        self.ledger.create(job_id, spec_json, spec.kind, spec.output, summary["items"], n_units,
                           carried=summary.get("carried", 0))
        return summary, n_units

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
        own_queue = job_kind(spec.kind).queue
        if own_queue is not None:
            return own_queue
        lane = getattr(spec, "lane", "auto")
        if lane == "auto":
            lane = "interactive" if n_units <= self.settings.interactive_max_shards else "bulk"
        return QUEUE_INTERACTIVE if lane == "interactive" else QUEUE_DEFAULT

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
