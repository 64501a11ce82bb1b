"""How each kind is checked and planned at submit: the `plan` of its record (kinds.py).

Submit walks one line for every kind: the prefix check, `kind.plan(spec, store)` (the kind's own
checks, then its plan), hold the prefix, write what the plan writes into the job's folder, record
the job, enqueue `plan.first()`. A plan is whatever answers `Planned`: the planner's `Plan` (image
shards in manifests), a `VectorPlan` (phases of shards over an embed job's vectors: `plan_dedup`,
`plan_neighbors`, from vectorplan.py) or `OneTask`
(one task is the whole job: finetune, evaluate, export). Every function here reads the store and
writes nothing; SpecError names the first problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.inputs.planner import Plan, plan_job
from orchestrator.inputs.vectorplan import plan_dedup, plan_neighbors
from orchestrator.jobspec.checks.models import check_export, check_model_options
from orchestrator.jobspec.checks.training import check_evaluate, check_finetune
from orchestrator.jobspec.imagespecs import InferenceSpec
from orchestrator.jobspec.modelrefs import model_identity, read_config
from orchestrator.jobspec.modelspecs import EvaluateSpec, ExportSpec, FinetuneSpec
from orchestrator.store.storage import ObjectStore

__all__ = ["OneTask", "plan_dedup", "plan_evaluate", "plan_export", "plan_finetune", "plan_images",
           "plan_neighbors"]


@dataclass(frozen=True)
class OneTask:
    """The plan of a kind whose one task is the whole job: its counts, nothing to write."""

    counts: dict = field(default_factory=dict)
    n_shards: int = 1
    model_identity: str | None = None  # its task loads the model itself; nothing is carried over

    def summary(self) -> dict:
        return self.counts

    def first(self) -> range:
        return range(1)

    def write(self, folder: str, store: ObjectStore) -> None:
        """The task writes its own files."""


def plan_images(spec: InferenceSpec, store: ObjectStore) -> Plan:
    """classify, embed, attention: what the spec asks of its model, then image shards of its input,
    with the model's identity that a nightly run's carry-over compares."""
    check_model_options(spec, read_config(spec.model, store))  # layers, top_k, architecture, remote code
    job_plan = plan_job(spec, store)
    job_plan.model_identity = model_identity(spec.model, store)
    return job_plan


def plan_finetune(spec: FinetuneSpec, store: ObjectStore) -> OneTask:
    return OneTask(check_finetune(spec, store))


def plan_evaluate(spec: EvaluateSpec, store: ObjectStore) -> OneTask:
    return OneTask(check_evaluate(spec, store))


def plan_export(spec: ExportSpec, store: ObjectStore) -> OneTask:
    return OneTask(check_export(spec, store))
