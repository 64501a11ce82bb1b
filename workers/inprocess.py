"""A whole job in one process, without Redis or Celery: recorded in a memory ledger, then every unit
through the one lifecycle (workers/lifecycle.py) that queued units go through.

Unit tests and bench/ use it to drive the real shard path. It plans as submit does (`plan_job`
for image shards, `plan_vectors` for an embed job's vectors), holds the prefix, writes the job's
folder and `_job.json` (in the folder and at the prefix, built by incremental.submitted_job), and
records the job in an in-memory ledger (orchestrator/lifecycle/memoryledger.py); each unit is
leased, run fenced, committed and settled there, and the last one finalizes the job with
finalize.py: the same record, publication claim and removal of replaced folders as a queued job.
A unit that raises stops the run with its error (a queued unit would be retried): a not-retryable
one has failed the job first, as it does queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.constants import JOB_SPEC_FILE
from orchestrator.inputs.manifest import write_manifests
from orchestrator.inputs.planner import plan_job
from orchestrator.inputs.vectorplan import plan_vectors
from orchestrator.jobspec.imagespecs import InferenceSpec
from orchestrator.jobspec.kinds import job_kind
from orchestrator.jobspec.vectorspecs import DedupSpec, NeighborsSpec
from orchestrator.lifecycle.commits import ShardMarker
from orchestrator.lifecycle.finalize import committed_markers, finalize
from orchestrator.lifecycle.memoryledger import MemoryLedger
from orchestrator.lifecycle.states import JobState
from orchestrator.published.outputs import job_dir, new_job_id
from orchestrator.store.storage import ObjectStore, join
from orchestrator.submission.incremental import submitted_job
from workers.context import WorkerContext
from workers.errors import ShardFailed
from workers.lifecycle import run_unit, unit_work

ShardedSpec = InferenceSpec | DedupSpec | NeighborsSpec  # the kinds whose units are shards


def _quiet(text: str) -> None:
    """No monitor listens in process: a unit's progress text goes nowhere (its count to the ledger)."""


def plan_units(spec: ShardedSpec, folder: str, store: ObjectStore) -> tuple[dict, int]:
    """Plan as submit does and write the plan into the job's folder; the plan's summary and its units.

    The planners submit's plans call, without the submit-time checks around them (the kind's
    `planned`): a job run here reaches the worker's own refusals (tests/models/test_checkpoints)."""
    if job_kind(spec.kind).unit == "vectors":
        vector_plan = plan_vectors(spec, store)  # type: ignore[arg-type]
        vector_plan.write(folder, store)
        return vector_plan.summary(), vector_plan.n_shards
    job_plan = plan_job(spec, store)  # type: ignore[arg-type]
    write_manifests(job_plan, folder, store)
    return {**job_plan.summary(), "carried": 0}, job_plan.n_shards


@dataclass
class LocalJob:
    """A job recorded in this process's memory ledger; `ctx` is the caller's context over that ledger."""

    spec: ShardedSpec
    job_id: str
    ctx: WorkerContext
    n_units: int

    @classmethod
    def record(cls, spec: ShardedSpec, ctx: WorkerContext, job_id: str | None = None) -> LocalJob:
        """Plan, hold the prefix, write the job's folder and `_job.json`, and record the job (as submit does)."""
        job_id = job_id or new_job_id()
        local = ctx.over(MemoryLedger())
        folder = job_dir(spec.output, job_id)
        local.ledger.hold_output(spec.output, job_id)
        summary, n_units = plan_units(spec, folder, local.store)
        record = submitted_job(job_id, spec, summary, local.store).to_bytes()
        local.store.write(join(folder, JOB_SPEC_FILE), record)
        local.store.write(join(spec.output, JOB_SPEC_FILE), record)
        local.ledger.create(job_id, spec.model_dump_json(), spec.kind, spec.output, summary["items"], n_units,
                            carried=summary.get("carried", 0))
        return cls(spec, job_id, local, n_units)

    def run_unit(self, unit: int, finalize_when_settled: bool = True) -> dict:
        """One unit's life; the last to settle finalizes the job unless told not to (`finish` then does)."""
        try:
            return run_unit(self.ctx, self.job_id, unit, unit_work(self.spec.kind, unit, _quiet),
                            settle=None if finalize_when_settled else lambda _job_id: None)
        except ShardFailed as e:  # the job failed for a not-retryable reason: raise that reason itself
            raise (e.__cause__ if isinstance(e.__cause__, Exception) else e) from None

    def run(self) -> tuple[str, list[ShardMarker]]:
        """Every unit in order (a vector job's phases follow each other), then the job is finalized."""
        for unit in range(self.n_units):
            self.run_unit(unit)
        if self.n_units == 0:  # nothing to run: ended at once, as submit ends it
            self.finish()
        return self.job_id, self.markers()

    def finish(self) -> JobState:
        """Finalize the job once its units have settled (what the last unit does unless deferred)."""
        return finalize(self.job_id, self.ctx.ledger, self.ctx.store)

    def markers(self) -> list[ShardMarker]:
        """The job's committed markers, in unit order."""
        return committed_markers(self.job_id, self.spec.output, self.ctx.ledger, self.ctx.store, carried=0)


def run_local(spec: ShardedSpec, ctx: WorkerContext, job_id: str | None = None) -> tuple[str, list[ShardMarker]]:
    """Run every unit of `spec` here and publish the job; returns its id and commit markers."""
    return LocalJob.record(spec, ctx, job_id).run()


def run_vectors_local(spec: DedupSpec | NeighborsSpec, store: ObjectStore,
                      job_id: str | None = None) -> tuple[str, list[ShardMarker]]:
    """A dedup or neighbors job run here: it loads no model, so a context of the store's settings will do."""
    return run_local(spec, WorkerContext(store.settings), job_id)
