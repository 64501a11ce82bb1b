"""run_shard as a plain function: manifest in, committed part out. Tasks call this; so do tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from orchestrator.config import Settings
from orchestrator.jobs import JobSpec
from orchestrator.ledger import Ledger
from orchestrator.planner import read_manifest
from orchestrator.storage import ObjectStore
from workers.heads import ClassifyHead
from workers.models import ModelCache
from workers.pipeline import ShardPipeline
from workers.writers import classify_parts, commit_shard

ProgressFn = Callable[[int, int], None]


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life: settings, store, ledger, models."""

    settings: Settings

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger.from_url(self.settings.backend_url)

    @cached_property
    def models(self) -> ModelCache:
        return ModelCache(self.settings, self.store)


def run_shard(spec: JobSpec, shard: int, ctx: WorkerContext, on_progress: ProgressFn | None = None) -> dict:
    """Compute one shard and commit it; returns the commit marker."""
    items = read_manifest(spec.output, shard, ctx.store)
    model = ctx.models.get(spec.model, spec.device, spec.precision)
    head = ClassifyHead(model, spec.top_k)
    pipeline = ShardPipeline(
        model, ctx.store, batch_size=spec.batch_size, read_concurrency=spec.read_concurrency,
        max_bytes=ctx.settings.max_object_bytes, max_pixels=ctx.settings.max_pixels,
    )
    rows, times = pipeline.run(items, head, on_progress)
    t0 = time.perf_counter()
    parts = classify_parts(shard, rows, head.schema)
    errors = sum(1 for row in rows if row["error"] is not None)
    summary = {"rows": len(rows), "errors": errors, "model_fingerprint": model.fingerprint}
    times.write_s = time.perf_counter() - t0
    marker = commit_shard(ctx.store, spec.output, shard, parts, {**summary, "stats": times.to_json()})
    return marker
