"""The heads' factory: the head (and its model) one shard of a job needs.

It sits above heads.py (classify, zero-shot, embed) and attention.py (which builds on heads'
`ArrayHead`), so neither of those imports the other back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.constants import JOBS_DIR
from orchestrator.jobspec.imagespecs import AttentionSpec, ClassifySpec, EmbedSpec, InferenceSpec
from workers import hooks
from workers.attention import AttentionHead
from workers.heads import ClassifyHead, EmbedHead, Head, ZeroShotHead

if TYPE_CHECKING:
    from workers.context import WorkerContext  # the context builds models and pools: only its type is needed here


def for_job(spec: InferenceSpec, shard: int, ctx: WorkerContext, job_id: str = "") -> Head:
    """The head for shard `shard` of `spec`, over the model the spec names (from the worker's
    cache, a real load timed in its metrics). `job_id` places the overlays' paths in the job's folder.
    The head is the kind's: HEADS holds one maker per kind that runs image shards (kinds.py)."""
    return HEADS[spec.kind](spec, shard, ctx, job_id)


def _classify(spec: ClassifySpec, shard: int, ctx: WorkerContext, job_id: str) -> Head:
    """Top-k of the model's own classifier, or zero-shot over --labels with an image-text model."""
    model = hooks.loaded(ctx.models.get, spec.model, spec.device, spec.precision, compile=spec.compile)
    if spec.labels is not None:
        return ZeroShotHead(model, shard, spec.top_k, spec.labels, spec.prompt)
    return ClassifyHead(model, shard, spec.top_k)


def _embed(spec: EmbedSpec, shard: int, ctx: WorkerContext, job_id: str) -> Head:
    model = hooks.loaded(ctx.models.get, spec.model, spec.device, spec.precision, compile=spec.compile)
    return EmbedHead(model, shard, spec.pooling, spec.normalize, spec.parquet_vectors)


def _attention(spec: AttentionSpec, shard: int, ctx: WorkerContext, job_id: str) -> Head:
    """Eager attention: SDPA returns no weights."""
    model = hooks.loaded(ctx.models.get, spec.model, spec.device, spec.precision, attn="eager", compile=spec.compile)
    return AttentionHead(model, shard, layers=spec.layers, heads=spec.heads, with_rollout=spec.rollout,
                         overlay_indices=overlay_indices(spec, shard),
                         overlay_prefix=f"{JOBS_DIR}/{job_id}/" if job_id else "")


# One head maker per kind that runs image shards, by the kind's name (its spec's `kind`);
# tests/unit/test_kinds.py holds these names to the registry's image kinds.
HEADS: dict[str, Callable[[Any, int, WorkerContext, str], Head]] = {
    "classify": _classify,
    "embed": _embed,
    "attention": _attention,
}


def overlay_indices(spec: AttentionSpec, shard: int) -> set[int]:
    """The shard's items (by index in the shard) that get a PNG overlay: those among the job's
    first `max_overlays` images, or every one when it is unset."""
    first = shard * spec.shard_size
    limit = spec.max_overlays if spec.max_overlays is not None else first + spec.shard_size
    return set(range(max(0, min(spec.shard_size, limit - first))))
