"""workers/metrics.py in-process: what one committed shard adds, model loads vs cache hits,
and the port each GPU process of `vitbatch worker --gpus` serves on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.commits import ShardMarker
from orchestrator.gpupool import metrics_port
from workers import metrics


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_committed_shard_adds_its_rows_errors_and_stage_seconds():
    before_ok = sample("vitbatch_images_total", kind="embed", outcome="ok")
    before_err = sample("vitbatch_images_total", kind="embed", outcome="error")
    before_read = sample("vitbatch_stage_seconds_total", kind="embed", stage="read")
    before_shards = sample("vitbatch_shard_duration_seconds_count", kind="embed")
    marker = ShardMarker(job_id="j", shard=0, parts={}, rows=10, errors=3, batch_size=8,
                         stats={"read_s": 1.5, "decode_s": 0.5, "compute_s": 2.0})
    metrics.record_shard("embed", marker, 4.2)
    assert sample("vitbatch_images_total", kind="embed", outcome="ok") - before_ok == 7
    assert sample("vitbatch_images_total", kind="embed", outcome="error") - before_err == 3
    assert sample("vitbatch_stage_seconds_total", kind="embed", stage="read") - before_read == pytest.approx(1.5)
    assert sample("vitbatch_shard_duration_seconds_count", kind="embed") - before_shards == 1
    assert sample("vitbatch_batch_size", kind="embed") == 8


def test_a_failed_shard_counts_as_not_committed_and_leaves_the_in_flight_gauge_at_rest():
    spec = SimpleNamespace(kind="attention")
    before = sample("vitbatch_shards_total", kind="attention", outcome="not_committed")

    @metrics.instrumented_shard
    def run(spec):
        assert sample("vitbatch_shards_in_flight") >= 1
        raise OSError("S3 went away")

    in_flight = sample("vitbatch_shards_in_flight")
    with pytest.raises(OSError):
        run(spec)
    assert sample("vitbatch_shards_total", kind="attention", outcome="not_committed") - before == 1
    assert sample("vitbatch_shards_in_flight") == in_flight


class Model:
    """Stands for workers.models.LoadedModel: a plain (weak-referenceable) object."""


def test_only_a_real_model_load_is_observed_not_a_cache_hit():
    cached = Model()
    before = sample("vitbatch_model_load_seconds_count")
    assert metrics.timed_model(lambda ref: cached, "ref") is cached
    assert metrics.timed_model(lambda ref: cached, "ref") is cached  # the cache returns the same object
    assert sample("vitbatch_model_load_seconds_count") - before == 1
    metrics.timed_model(lambda ref: Model(), "ref2")
    assert sample("vitbatch_model_load_seconds_count") - before == 2


def test_each_gpu_process_serves_on_the_base_port_plus_its_index():
    assert [metrics_port(9100, gpu, i) for i, gpu in enumerate(["0", "2", "5"])] == [9100, 9102, 9105]
    assert metrics_port(9100, "GPU-3f2a", 1) == 9101  # UUIDs: the position in the list
