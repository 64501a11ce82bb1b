"""The Celery task of dedup and neighbors shards: the one unit life (workers/lifecycle.py), plus phases.

A shard runs only once the phase before it has committed (orchestrator/inputs/vectorplan.py); one
delivered early does nothing and stays pending. The delivery that commits the last shard of
a phase sends the next phase. Two such deliveries at once both send it; the duplicate
message finds the shard running (its heartbeat is fresh) or committed, and does nothing.
"""

from __future__ import annotations

from celery import Task

from orchestrator.constants import TASK_VECTOR_SHARD
from orchestrator.errors import JobNotFound
from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.states import ShardState
from orchestrator.published.outputs import job_dir
from orchestrator.submission.enqueue import send_units
from workers.celery import app
from workers.context import WorkerContext
from workers.lifecycle import held_elsewhere, vector_work
from workers.tasks import TASK_OPTIONS, announcer, context, execute, redis_ledger


def job_plan(ctx: WorkerContext, job_id: str) -> VectorPlan:
    spec = parse_spec(ctx.ledger.spec_json(job_id))
    return VectorPlan.read(job_dir(spec.output, job_id), ctx.store)


def waiting_for(plan: VectorPlan, states: dict[int, ShardState], shard: int) -> list[int]:
    """The shards of the previous phase that have not committed yet."""
    return [s for s in plan.needs(shard) if states.get(s) is not ShardState.COMMITTED]


def send_next_phase(ctx: WorkerContext, plan: VectorPlan, job_id: str, shard: int) -> list[int]:
    """Send the next phase's uncommitted shards once `shard`'s whole phase has committed."""
    states = ctx.ledger.shard_states(job_id)
    phase = plan.phase_range(plan.phase(shard)[0])
    if any(states.get(s) is not ShardState.COMMITTED for s in phase):
        return []
    todo = [s for s in plan.follows(shard) if states.get(s) is not ShardState.COMMITTED]
    ledger = redis_ledger(ctx)
    return send_units(app, ledger, job_id, plan.kind, todo, ledger.queue(job_id))


@app.task(name=TASK_VECTOR_SHARD, **TASK_OPTIONS)
def vector_shard(self: Task, job_id: str, shard: int) -> dict:
    ctx = context()
    try:
        plan = job_plan(ctx, job_id)
        waiting = waiting_for(plan, ctx.ledger.shard_states(job_id), shard)
    except JobNotFound:
        return {"shard": shard, "skipped": "job unknown to this Redis"}
    if waiting:
        return {"shard": shard, "waiting_for": waiting}  # sent again when they have committed
    if held_elsewhere(ctx, job_id, shard):
        return {"shard": shard, "skipped": "another delivery is running this shard"}
    result = execute(self, job_id, shard, vector_work(shard, announcer(self)))
    if "rows" in result:  # committed (or found committed): the next phase may be due
        send_next_phase(ctx, plan, job_id, shard)
    return result
