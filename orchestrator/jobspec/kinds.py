"""Job kinds: each kind is one record here, and whatever differs between kinds is read from it.

A kind's spec (its pydantic model, with what it asks of its model's checkpoint) lives with its family
(`imagespecs.py`, `modelspecs.py`, `vectorspecs.py`; `jobs.JobSpec` is their union), its submit-time
checks and plan in `plans.py`; everything else the control plane and the workers
need to know about it is a field of its `JobKind`: the CLI makes `submit <name>` and `run <name>`
from `spec`, submit runs `plan`, submit and the enqueuer send `task`, the reconciler reads
`slow_unit`, a job's record reads `makes_model`, the worker's metrics read `runs_shards`.
`tests/unit/test_kinds.py` fails when a registered kind lacks a piece (a spec in the `JobSpec`
union, a plan, a task the worker app registers, a worker head, a CLI command, a schema entry, a row
in docs/architecture.md).
"""

from __future__ import annotations

import functools
import importlib
import operator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, Field, TypeAdapter

from orchestrator.constants import (
    QUEUE_TRAIN,
    TASK_EVALUATE,
    TASK_EXPORT,
    TASK_FINETUNE,
    TASK_RUN_SHARD,
    TASK_VECTOR_SHARD,
)
from orchestrator.errors import SpecError
from orchestrator.jobspec.imagespecs import AttentionSpec, ClassifySpec, EmbedSpec
from orchestrator.jobspec.modelspecs import EvaluateSpec, ExportSpec, FinetuneSpec
from orchestrator.jobspec.vectorspecs import DedupSpec, NeighborsSpec
from orchestrator.store.storage import ObjectStore

Unit = Literal["images", "single", "vectors"]
# A job page's body: a sample of result rows; nothing (the output is a model); the evaluation's metrics and
# then its rows; duplicate groups, kept image first; queries with their neighbors.
PageBody = Literal["rows", "model", "evaluation", "duplicates", "neighbors"]
PLANS = "orchestrator.jobspec.plans"  # where each kind's `plan` function lives


class Planned(Protocol):
    """A kind's plan as submit uses it, whatever the kind's unit (plans.py makes them)."""

    @property
    def n_shards(self) -> int: ...  # the job's units (tasks), all phases together

    def summary(self) -> dict: ...  # the plan's counts, for `_job.json` and the submit output (`items` at least)

    def first(self) -> range: ...  # the units enqueued at submit (a vector job's later phases follow)

    def write(self, folder: str, store: ObjectStore) -> None: ...  # into the job's folder, once the prefix is held

    @property
    def model_identity(self) -> str | None: ...  # the model's files as planned (an image kind's), else None


@dataclass(frozen=True)
class JobKind:
    """What one job kind is, in one place."""

    name: str  # the spec's `kind`, the CLI command and the ledger's job kind
    spec: type[BaseModel]  # its pydantic spec (imagespecs, modelspecs or vectorspecs.py)
    unit: Unit  # images: shards of images planned into manifests; single: one task is the whole job;
    #             vectors: shards of an embed job's vectors, in phases (vectorplan.py)
    task: str  # the Celery task one unit runs as (constants.TASK_*)
    plan: str  # its function in plans.py: submit's checks of the kind, then its plan (what to write and enqueue)
    slow_unit: bool = False  # one long unit that reports progress sparsely: never handed on as stalled
    makes_model: bool = False  # its output is a model (`--model <output>` loads it), made from PyTorch modules
    exclusive: bool = False  # a redelivery must not run beside a live run (two trainers on one output fight)
    queue: str | None = None  # a queue of its own; None: the job's lane (interactive or bulk)
    carries_over: bool = False  # a nightly run carries unchanged rows over from the previous run (incremental.py)
    rows_shown: int = 0  # result rows `vitbatch run` prints once the job has succeeded
    page: PageBody = "rows"  # what its `_report.html` shows besides the record (published/report.py)

    @property
    def runs_shards(self) -> bool:
        """Its units run through workers/runner.run_shard: image shards planned from manifests at submit."""
        return self.unit == "images"

    def planned(self, spec: Any, store: ObjectStore) -> Planned:
        """Check `spec` as this kind and plan it (SpecError on the first problem). The function is named,
        as `task` is, and found when a job is planned: the job records below submit (commits, results)
        read this registry, and the plans read them, so the registry imports no plan."""
        return getattr(importlib.import_module(PLANS), self.plan)(spec, store)

    def task_args(self, job_id: str, unit: int) -> list:
        """The task's arguments for one unit (a single task takes the job only)."""
        return [job_id] if self.unit == "single" else [job_id, unit]


def _images(name: str, spec: type[BaseModel], **traits) -> JobKind:
    return JobKind(name, spec, "images", TASK_RUN_SHARD, "plan_images", **traits)


def _single(name: str, spec: type[BaseModel], task: str, plan: str, **traits) -> JobKind:
    return JobKind(name, spec, "single", task, plan, slow_unit=True, **traits)


def _vectors(name: str, spec: type[BaseModel], plan: str, **traits) -> JobKind:
    return JobKind(name, spec, "vectors", TASK_VECTOR_SHARD, plan, **traits)


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    _images("classify", ClassifySpec, carries_over=True, rows_shown=5),
    _images("embed", EmbedSpec),
    _images("attention", AttentionSpec),
    _single("finetune", FinetuneSpec, TASK_FINETUNE, "plan_finetune", makes_model=True, page="model", exclusive=True,
            queue=QUEUE_TRAIN),
    _single("evaluate", EvaluateSpec, TASK_EVALUATE, "plan_evaluate", page="evaluation"),
    _single("export", ExportSpec, TASK_EXPORT, "plan_export", makes_model=True, page="model"),
    _vectors("dedup", DedupSpec, "plan_dedup", page="duplicates"),
    _vectors("neighbors", NeighborsSpec, "plan_neighbors", page="neighbors"),
)}


def job_kind(name: str) -> JobKind:
    """The registered kind called `name`; SpecError naming the kinds there are."""
    try:
        return KINDS[name]
    except KeyError:
        raise SpecError(f"unknown job kind {name!r}: one of {', '.join(KINDS)}") from None


def spec_schema() -> dict:
    """The JSON schema of every registered kind's spec (`vitbatch schema`): a union on `kind`."""
    union = functools.reduce(operator.or_, (kind.spec for kind in KINDS.values()))
    # a union built at run time, which mypy cannot type (jobs.JobSpec is its static twin)
    return TypeAdapter(Annotated[union, Field(discriminator="kind")]).json_schema()  # type: ignore[valid-type, arg-type]
