"""Prometheus metrics of one worker process, served on VITBATCH_METRICS_PORT (0: off).

Labels stay low-cardinality (job kind, stage, outcome, device): a worker serves many jobs over
its life and Prometheus keeps one series per label set, so job ids and keys never appear here.
Per-job numbers come from the fleet exporter (orchestrator/fleetmetrics.py), which reads the ledger.
One process is one GPU (`vitbatch worker --gpus` gives each its own port), so a scrape target
is a GPU and Prometheus's `instance` label tells GPUs apart.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from orchestrator.commits import ShardMarker
from orchestrator.config import Settings
from orchestrator.gpupool import listed_gpus

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()  # ours only: a scrape shows what this module defines, plus process stats
ProcessCollector(registry=REGISTRY)

SHARD_KINDS = ("classify", "embed", "attention")  # the kinds whose shards run through runner.run_shard
STAGES = ("read", "decode", "device_decode", "compute", "write")  # the commit marker's stats, `<stage>_s`

IMAGES = Counter("vitbatch_images_total", "Images finished, by job kind and outcome (ok, or an error row).",
                 ["kind", "outcome"], registry=REGISTRY)
STAGE_SECONDS = Counter("vitbatch_stage_seconds_total", "Seconds spent per pipeline stage (read and decode "
                        "summed over threads, the others wall time).", ["kind", "stage"], registry=REGISTRY)
SHARDS = Counter("vitbatch_shards_total", "Shard deliveries that ended, by outcome: committed, or not_committed "
                 "(an error that will be retried, or a cancelled job).", ["kind", "outcome"], registry=REGISTRY)
SHARD_DURATION = Histogram("vitbatch_shard_duration_seconds", "Wall time of one shard, manifest to commit marker.",
                           ["kind"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
                           registry=REGISTRY)
SHARDS_IN_FLIGHT = Gauge("vitbatch_shards_in_flight", "Shards this process is working on now.", registry=REGISTRY)
MODEL_LOAD = Histogram("vitbatch_model_load_seconds", "Seconds to load a model that was not in the worker's cache.",
                       buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640), registry=REGISTRY)
BATCH_SIZE = Gauge("vitbatch_batch_size", "Batch size of the last shard, after any out-of-memory halving.",
                   ["kind"], registry=REGISTRY)
WORKER_INFO = Gauge("vitbatch_worker_info", "1 per worker process: its Celery name and the GPUs it sees.",
                    ["worker", "gpus"], registry=REGISTRY)

for _kind in SHARD_KINDS:  # every series exists from the start, so rate() sees the first shard
    for _outcome in ("ok", "error"):
        IMAGES.labels(_kind, _outcome)
    for _stage in STAGES:
        STAGE_SECONDS.labels(_kind, _stage)


class DeviceMemoryCollector:
    """vitbatch_device_memory_bytes, read from torch on each scrape; nothing on a CPU-only worker.

    Reads only a CUDA context the worker already made (a scrape never initializes CUDA or imports torch).
    """

    NAME = "vitbatch_device_memory_bytes"
    HELP = "CUDA memory per device: allocated by tensors, reserved by torch's caching allocator, total."

    def describe(self):
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["device", "state"])

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["device", "state"])
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
                family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
                family.add_metric([device, "total"], torch.cuda.get_device_properties(index).total_memory)
        yield family


REGISTRY.register(DeviceMemoryCollector())


def record_shard(kind: str, marker: ShardMarker, duration_s: float) -> None:
    """Count one committed shard from its commit marker (rows, errors, stats, batch_size)."""
    IMAGES.labels(kind, "ok").inc(max(0, marker.good_rows))
    IMAGES.labels(kind, "error").inc(marker.errors)
    for stage in STAGES:
        STAGE_SECONDS.labels(kind, stage).inc(max(0.0, float(marker.stats.get(f"{stage}_s") or 0.0)))
    SHARD_DURATION.labels(kind).observe(duration_s)
    SHARDS.labels(kind, "committed").inc()
    if marker.batch_size:
        BATCH_SIZE.labels(kind).set(marker.batch_size)


def instrumented_shard(run):
    """Decorates runner.run_shard(spec, ...): in-flight gauge, duration, and record_shard on commit."""

    @functools.wraps(run)
    def wrapper(spec, *args, **kwargs):
        SHARDS_IN_FLIGHT.inc()
        started = time.perf_counter()
        try:
            marker = run(spec, *args, **kwargs)
        except BaseException:
            SHARDS.labels(spec.kind, "not_committed").inc()
            raise
        finally:
            SHARDS_IN_FLIGHT.dec()
        record_shard(spec.kind, marker, time.perf_counter() - started)
        return marker

    return wrapper


_seen_models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> model already counted


def timed_model(get, *args, **kwargs):
    """`get(*args, **kwargs)` (ModelCache.get), observed in vitbatch_model_load_seconds when it really
    loaded: a model object not returned before. Cache hits take microseconds and would hide the loads."""
    started = time.perf_counter()
    model = get(*args, **kwargs)
    if _seen_models.get(id(model)) is not model:
        MODEL_LOAD.observe(time.perf_counter() - started)
        try:
            _seen_models[id(model)] = model
        except TypeError:  # not weak-referenceable: every call counts as a load, the shard goes on
            pass
    return model


_served: dict[str, int] = {}


def serve(port: int, address: str, worker: str) -> bool:
    """Start the HTTP endpoint once per process (a daemon thread); False when the port is taken.

    A taken port is logged, not raised: a worker without metrics still computes, and under
    `worker --gpus` a crash would only restart it into the same conflict.
    """
    WORKER_INFO.labels(worker, ",".join(listed_gpus())).set(1)
    if _served:
        return True
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as e:
        log.error("metrics endpoint not started on %s:%d: %s", address, port, e)
        return False
    _served["port"] = port
    log.info("metrics: http://%s:%d/metrics", address, port)
    return True


def on_worker_init(sender=None, **_) -> None:
    """Celery's worker_init (the worker's main process, where solo and threads pools run tasks)."""
    settings = Settings()
    if settings.metrics_port:
        serve(settings.metrics_port, settings.metrics_address, getattr(sender, "hostname", "") or "")
