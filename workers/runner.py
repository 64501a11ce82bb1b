"""A shard, one way: manifest -> read -> decode -> batch -> compute -> collect -> write -> commit.

`run_shard` is a plain function (tasks call it; so do tests): the pipeline yields batches
and failed items, the device stage turns a batch into the head's output, the head
collects rows, and the writers upload the parts and the commit marker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import pyarrow as pa
import torch

from orchestrator.inputs.manifest import Item, read_kept_columns, read_manifest
from orchestrator.inputs.parquetinputs import columns_of
from orchestrator.inputs.tarsamples import NO_FIELDS, TarFields, fields_of
from orchestrator.jobspec.imagespecs import InferenceSpec
from orchestrator.lifecycle.commits import JobStamp, ShardMarker, ShardWork
from orchestrator.store.scope import input_root, outside_input
from orchestrator.store.storage import ObjectStore
from workers import hooks, jobheads
from workers.compute import DeviceStage
from workers.context import WorkerContext
from workers.decode.parquetshards import Passthrough, expand_row_groups
from workers.decode.tarshards import expand_rows
from workers.loaded import LoadedModel
from workers.models import default_batch_size
from workers.pipeline import Blobs, DecodePath, Failed, ShardPipeline, decode_path
from workers.stagetimes import StageTimes
from workers.writers import commit_shard, upload_parts

ProgressFn = Callable[[int, int], None]


class Collector(Protocol):
    """What run_items asks of a head: a heads.Head, or evaluate's EvalHead (top-k per image)."""

    model: LoadedModel

    def forward(self, pixels: torch.Tensor) -> object: ...

    def collect(self, indices: list[int], items: list[Item], output, images=None) -> None: ...

    def error(self, index: int, item: Item, reason: str) -> None: ...

    def wants_image(self, index: int) -> bool: ...

log = logging.getLogger(__name__)


def expand_tars(items: list[Item], ctx: WorkerContext, scope: str | None = None, fields: TarFields = NO_FIELDS,
                kept: pa.Schema | None = None) -> tuple[list[Item], dict[str, bytes | str], list[dict]]:
    """Replace .tar items by their samples' rows, each tar read in one go; (items, blobs, kept fields per row).

    `scope` (the job's `input_root`): a tar outside it is one error row, never opened; a
    manifest line is not to be trusted more than the spec that planned it.
    """
    if not any(item.tar for item in items):
        return items, {}, []
    out: list[Item] = []
    blobs: dict[str, bytes | str] = {}
    kept_rows: list[dict] = []
    for item in items:
        if not item.tar:
            out.append(item)
            kept_rows.append({})
            continue
        if scope is not None and (why := outside_input(item.uri, scope)) is not None:
            out.append(Item(item.key, item.uri, item.size, item.etag))
            blobs[item.uri] = why
            kept_rows.append({})
            continue
        rows = expand_rows(item, ctx.store, ctx.settings.max_tar_bytes, ctx.settings.max_object_bytes,
                           within=scope, fields=fields, kept=kept)
        out += rows.items
        blobs.update(rows.blobs)
        kept_rows += rows.kept
    return out, blobs, kept_rows


def expand_parquet(items: list[Item], blobs: dict, spec: InferenceSpec, ctx: WorkerContext, scope: str | None,
                   kept: pa.Schema | None = None, kept_rows: list[dict] | None = None):
    """Replace parquet row groups by their rows; (items, blobs, pass-through columns or None).

    A parquet shard holds row groups only (the planner never mixes them with files), so its
    blobs are the row groups' cells, read one row group at a time as the pipeline asks. With
    --keep-columns every shard writes the planned columns (`kept`; a tar's rows bring their values in
    `kept_rows`, null in rows of image files).
    """
    groups = [item for item in items if item.row_group >= 0]
    if not groups:
        return items, blobs, Passthrough(list(kept), kept_rows or []) if kept is not None else None
    expanded = expand_row_groups(groups, ctx.store, columns_of(spec), max_bytes=ctx.settings.max_object_bytes,
                                 max_group_bytes=ctx.settings.max_tar_bytes, scope=scope, kept=kept)
    return expanded.items, expanded.cells, expanded.passthrough


def run_items(items: list[Item], head: Collector, pipeline: ShardPipeline, device: DeviceStage, times: StageTimes,
              on_progress: ProgressFn | None = None) -> None:
    """One way through a shard: read -> decode -> batch (pipeline), compute (device), collect (head).

    `times` is the timer the pipeline and the device stage add to; here compute, items and wall time."""
    start = time.perf_counter()
    done = 0
    for event in pipeline.batches(items, head.wants_image):
        if isinstance(event, Failed):
            head.error(event.index, event.item, event.reason)
            done += 1
            continue
        t0 = time.perf_counter()
        with head.model.lock:  # one shard at a time on the device; others keep reading
            for out in device.run(event, head.forward):
                if isinstance(out, Failed):
                    head.error(out.index, out.item, out.reason)
                else:
                    head.collect(out.indices, out.items, out.output, out.images)
        pipeline.path.release(event)
        times.compute_s += time.perf_counter() - t0
        done += len(event.decoded)
        if on_progress:
            on_progress(done, len(items))
    if on_progress:
        on_progress(done, len(items))
    times.items = len(items)
    times.wall_s = time.perf_counter() - start


def run_with(model: LoadedModel, store: ObjectStore, items: list[Item], head: Collector, path: DecodePath,
             times: StageTimes, *, batch_size: int, read_concurrency: int, max_bytes: int, blobs: Blobs | None = None,
             scope: str | None = None, on_progress: ProgressFn | None = None) -> int:
    """run_items over a pipeline and device stage built here, both timed into the caller's `times`;
    returns the batch size the shard ended with (after any out-of-memory halving)."""
    pipeline = ShardPipeline(store, path, times, batch_size=batch_size, read_concurrency=read_concurrency,
                             max_bytes=max_bytes, blobs=blobs, scope=scope)
    device = DeviceStage(model, path.decoder, batch_size, times)
    run_items(items, head, pipeline, device, times, on_progress)
    return device.batch_size


def run_shard(spec: InferenceSpec, shard: int, ctx: WorkerContext, on_progress: ProgressFn | None = None,
              job_id: str = "", stamp: JobStamp | None = None,
              on_found: Callable[[int], None] | None = None) -> ShardMarker:
    """Compute one shard and commit it into `spec.output` (the job's folder); returns the commit marker.

    A plain function: it reads and writes the object store only. Its caller hears of progress
    through `on_progress(done, total)` and of the images found inside the shard's tars (unknown
    when the job was planned) through `on_found(n_items)`; the task turns both into ledger writes.
    `stamp`: what names the job in the marker (JobStamp(job_id) when None). The worker's metrics
    hear of the shard through workers.hooks.
    """
    with hooks.shard(spec.kind) as events:
        return events.committed(_run_shard(spec, shard, ctx, on_progress, stamp or JobStamp(job_id), on_found))


def _run_shard(spec: InferenceSpec, shard: int, ctx: WorkerContext, on_progress: ProgressFn | None,
               stamp: JobStamp, on_found: Callable[[int], None] | None) -> ShardMarker:
    scope = input_root(spec.input)
    kept = read_kept_columns(spec.output, ctx.store) if getattr(spec, "keep_columns", None) else None
    items, blobs, kept_rows = expand_tars(read_manifest(spec.output, shard, ctx.store), ctx, scope, fields_of(spec), kept)
    if blobs and on_found is not None:  # the job's total grows by what the tars hold
        on_found(len(items))
    items, blobs, passthrough = expand_parquet(items, blobs, spec, ctx, scope, kept, kept_rows)  # counted when planned
    head = jobheads.for_job(spec, shard, ctx, stamp.job_id)
    head.passthrough = passthrough
    batch_size = spec.batch_size or default_batch_size(head.model.device)
    times = StageTimes()  # this shard's timer: the stages below add to it, the marker's stats report it
    with decode_path(spec.decode, head.model, ctx.decode_pool, ctx.settings.max_pixels, batch_size=batch_size,
                     read_concurrency=spec.read_concurrency, n_items=len(items),
                     jpeg_decode=spec.jpeg_decode) as path:
        batch_size = run_with(head.model, ctx.store, items, head, path, times, batch_size=batch_size,
                              read_concurrency=spec.read_concurrency, max_bytes=ctx.settings.max_object_bytes,
                              blobs=blobs, scope=scope, on_progress=on_progress)
    t0 = time.perf_counter()
    written = upload_parts(ctx.store, spec.output, head.parts())
    times.write_s = time.perf_counter() - t0  # serialising and uploading
    work = ShardWork(rows=len(head.rows), errors=head.errors, model_fingerprint=head.model.fingerprint,
                     compute=head.model.compute + path.decoder.provenance, worker=ctx.hostname,
                     batch_size=batch_size, stats=times.to_json())  # batch size after any out-of-memory halving
    return commit_shard(ctx.store, spec.output, shard, {}, stamp, work, written=written)
