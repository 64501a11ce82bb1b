"""Prometheus metrics of one worker process, served on VITBATCH_METRICS_PORT (0: off).

Labels stay low-cardinality (job kind, stage, outcome, device): a worker serves many jobs over
its life and Prometheus keeps one series per label set, so job ids and keys never appear here.
Per-job numbers come from the fleet exporter (orchestrator/fleet/fleetmetrics.py), which reads the ledger.
One process is one GPU (`vitbatch worker --gpus` gives each its own port), so a scrape target
is a GPU and Prometheus's `instance` label tells GPUs apart.

Importing this module defines and builds nothing: `on_worker_init` builds one `WorkerMetrics` in the
worker process at boot and registers it with workers.hooks, which the shard path reports to.
"""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from orchestrator.config import Settings
from orchestrator.jobspec.kinds import KINDS
from orchestrator.lifecycle.commits import ShardMarker
from orchestrator.stack.gpupool import listed_gpus
from workers import hooks

log = logging.getLogger(__name__)

SHARD_KINDS = tuple(name for name, kind in KINDS.items() if kind.runs_shards)  # the kinds runner.run_shard serves
STAGES = ("read", "decode", "device_decode", "compute", "write")  # the commit marker's stats, `<stage>_s`


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


class WorkerMetrics:
    """One worker process's registry and series (ours only: a scrape shows these plus process stats),
    and the hooks.ShardObserver that feeds them."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.images = Counter("vitbatch_images_total", "Images finished, by job kind and outcome (ok, or an error "
                              "row).", ["kind", "outcome"], registry=registry)
        self.stage_seconds = Counter("vitbatch_stage_seconds_total", "Seconds spent per pipeline stage (read and "
                                     "decode summed over threads, the others wall time).", ["kind", "stage"],
                                     registry=registry)
        self.shards = Counter("vitbatch_shards_total", "Shard deliveries that ended, by outcome: committed, or "
                              "not_committed (an error that will be retried, or a cancelled job).",
                              ["kind", "outcome"], registry=registry)
        self.shard_duration = Histogram("vitbatch_shard_duration_seconds", "Wall time of one shard, manifest to "
                                        "commit marker.", ["kind"], registry=registry,
                                        buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))
        self.in_flight = Gauge("vitbatch_shards_in_flight", "Shards this process is working on now.",
                               registry=registry)
        self.model_load = Histogram("vitbatch_model_load_seconds", "Seconds to load a model that was not in the "
                                    "worker's cache.", buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
                                    registry=registry)
        self.batch_size = Gauge("vitbatch_batch_size", "Batch size of the last shard, after any out-of-memory "
                                "halving.", ["kind"], registry=registry)
        self.worker_info = Gauge("vitbatch_worker_info", "1 per worker process: its Celery name and the GPUs it "
                                 "sees.", ["worker", "gpus"], registry=registry)
        registry.register(DeviceMemoryCollector())
        for kind in SHARD_KINDS:  # every series exists from the start, so rate() sees the first shard
            for outcome in ("ok", "error"):
                self.images.labels(kind, outcome)
            for stage in STAGES:
                self.stage_seconds.labels(kind, stage)
        self.served_port: int | None = None

    # -- hooks.ShardObserver ------------------------------------------------------------------------
    def shard_started(self, kind: str) -> None:
        self.in_flight.inc()

    def shard_ended(self, kind: str, marker: ShardMarker | None, duration_s: float) -> None:
        self.in_flight.dec()
        if marker is None:
            self.shards.labels(kind, "not_committed").inc()
        else:
            self.record_shard(kind, marker, duration_s)

    def model_loaded(self, seconds: float) -> None:
        self.model_load.observe(seconds)

    def record_shard(self, kind: str, marker: ShardMarker, duration_s: float) -> None:
        """Count one committed shard from its commit marker (rows, errors, stats, batch_size)."""
        self.images.labels(kind, "ok").inc(max(0, marker.good_rows))
        self.images.labels(kind, "error").inc(marker.errors)
        for stage in STAGES:
            self.stage_seconds.labels(kind, stage).inc(max(0.0, float(marker.stats.get(f"{stage}_s") or 0.0)))
        self.shard_duration.labels(kind).observe(duration_s)
        self.shards.labels(kind, "committed").inc()
        if marker.batch_size:
            self.batch_size.labels(kind).set(marker.batch_size)

    def serve(self, port: int, address: str, worker: str) -> bool:
        """Start the HTTP endpoint (a daemon thread); False when the port is taken.

        A taken port is logged, not raised: a worker without metrics still computes, and under
        `worker --gpus` a crash would only restart it into the same conflict.
        """
        self.worker_info.labels(worker, ",".join(listed_gpus())).set(1)
        if self.served_port is not None:
            return True
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            log.error("metrics endpoint not started on %s:%d: %s", address, port, e)
            return False
        self.served_port = port
        log.info("metrics: http://%s:%d/metrics", address, port)
        return True


_booted: list[WorkerMetrics] = []  # the process's one instance, once the worker has booted


def on_worker_init(sender=None, **_) -> None:
    """Celery's worker_init (the worker's main process, where solo and threads pools run tasks): build the
    metrics, hear the shard path, serve them on VITBATCH_METRICS_PORT (0: off)."""
    settings = Settings()
    if not settings.metrics_port or _booted:
        return
    metrics = WorkerMetrics()
    _booted.append(metrics)
    hooks.register(metrics)
    metrics.serve(settings.metrics_port, settings.metrics_address, getattr(sender, "hostname", "") or "")
