"""run_shard as a plain function: manifest in, committed part out. Tasks call this; so do tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

from orchestrator.constants import JOBS_DIR
from orchestrator.jobs import JobSpec
from orchestrator.manifest import Item, read_manifest
from orchestrator.scope import input_root, outside_input
from workers.attention import AttentionHead
from workers.decodepool import DecodeRecipe
from workers.errors import NoSharedMemory
from workers.heads import ClassifyHead, EmbedHead
from workers.metrics import instrumented_shard, timed_model
from workers.context import WorkerContext
from workers.models import LoadedModel, default_batch_size
from workers.pipeline import ShardPipeline
from workers.tarshards import expand
from workers.writers import commit_shard, upload_parts

ProgressFn = Callable[[int, int], None]
log = logging.getLogger(__name__)


def decode_mode(decode: str, model: LoadedModel) -> str:
    """auto: nvJPEG (plus processes) on CUDA; threads on a CPU, whose cores the model needs."""
    if decode == "auto":
        return "device" if model.device.type == "cuda" else "threads"
    return decode


def make_head(spec: JobSpec, shard: int, ctx: WorkerContext, job_id: str = ""):
    """The model (eager attention for attention maps: SDPA returns no weights) and the head."""
    if spec.kind == "attention":
        model = timed_model(ctx.models.get, spec.model, spec.device, spec.precision, attn="eager",
                            compile=spec.compile)
        first = shard * spec.shard_size
        limit = spec.max_overlays if spec.max_overlays is not None else first + spec.shard_size
        overlays = set(range(max(0, min(spec.shard_size, limit - first))))
        return AttentionHead(model, shard, layers=spec.layers, heads=spec.heads, with_rollout=spec.rollout,
                             overlay_indices=overlays, overlay_prefix=f"{JOBS_DIR}/{job_id}/" if job_id else "")
    model = timed_model(ctx.models.get, spec.model, spec.device, spec.precision, compile=spec.compile)
    if spec.kind == "embed":
        return EmbedHead(model, shard, spec.pooling)
    return ClassifyHead(model, shard, spec.top_k)


def expand_tars(items: list[Item], ctx: WorkerContext, scope: str | None = None
                ) -> tuple[list[Item], dict[str, bytes | str]]:
    """Replace .tar items by their image members, read in one go.

    `scope` (the job's `input_root`): a tar outside it is one error row, never opened; a
    manifest line is not to be trusted more than the spec that planned it.
    """
    if not any(item.tar for item in items):
        return items, {}
    out, blobs = [], {}
    for item in items:
        if not item.tar:
            out.append(item)
            continue
        if scope is not None and (why := outside_input(item.uri, scope)) is not None:
            out.append(Item(item.key, item.uri, item.size, item.etag))
            blobs[item.uri] = why
            continue
        members, member_blobs = expand(item, ctx.store, ctx.settings.max_tar_bytes, ctx.settings.max_object_bytes,
                                       within=scope)
        out += members
        blobs.update(member_blobs)
    return out, blobs


@instrumented_shard  # the worker's Prometheus metrics: images, stage seconds, shard duration
def run_shard(spec: JobSpec, shard: int, ctx: WorkerContext, on_progress: ProgressFn | None = None,
              job_id: str = "", marker_fields: dict | None = None) -> dict:
    """Compute one shard and commit it into `spec.output` (the job's folder); returns the commit marker.

    `marker_fields`: what names the job in the marker (job_id, spec_sha256).
    """
    items, blobs = expand_tars(read_manifest(spec.output, shard, ctx.store), ctx, scope=input_root(spec.input))
    if blobs and job_id:  # the job's total grows by what the tars hold
        ctx.ledger.shard_items(job_id, shard, len(items))
    head = make_head(spec, shard, ctx, (marker_fields or {}).get("job_id", job_id))
    mode = decode_mode(spec.decode, head.model)
    batch_size = spec.batch_size or default_batch_size(head.model.device)
    lane = nullcontext()
    if mode != "threads":
        slots = ShardPipeline.window(spec.read_concurrency, batch_size) + batch_size
        recipe = DecodeRecipe.for_model(head.model.prep, ctx.settings.max_pixels)
        try:
            lane = ctx.decode_pool.lane(min(slots, len(items) + 1), (*head.model.input_size, 3), recipe)
        except NoSharedMemory as e:
            log.warning("shard %d decodes in threads: %s", shard, e)
            mode = "threads"
    with lane as lane:
        pipeline = ShardPipeline(
            head.model, ctx.store, batch_size=batch_size, read_concurrency=spec.read_concurrency,
            max_bytes=ctx.settings.max_object_bytes, max_pixels=ctx.settings.max_pixels, blobs=blobs,
            lane=lane, device_jpegs=mode == "device", scope=input_root(spec.input),
        )
        times = pipeline.run(items, head, on_progress)
    t0 = time.perf_counter()
    written = upload_parts(ctx.store, spec.output, head.parts())
    times.write_s = time.perf_counter() - t0  # serialising and uploading
    summary = {**(marker_fields or {"job_id": job_id}), "rows": len(head.rows), "errors": head.errors,
               "model_fingerprint": head.model.fingerprint, "worker": ctx.hostname,
               "batch_size": pipeline.batch_size}  # after any out-of-memory halving
    return commit_shard(ctx.store, spec.output, shard, {}, {**summary, "stats": times.to_json()}, written=written)
