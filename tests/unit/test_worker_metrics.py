"""workers/metrics.py in-process, fed through workers.hooks as the shard path feeds it: what one committed
shard adds, model loads vs cache hits, and the port each GPU process of `vitbatch worker --gpus` serves on."""

from __future__ import annotations

import pytest

from orchestrator.lifecycle.commits import ShardMarker
from orchestrator.stack.gpupool import metrics_port
from workers import hooks, metrics


@pytest.fixture
def observed():
    """A WorkerMetrics registered with the shard path's hooks, as a worker does at boot."""
    worker_metrics = metrics.WorkerMetrics()
    hooks.register(worker_metrics)
    yield worker_metrics
    hooks.unregister(worker_metrics)


def sample(worker_metrics: metrics.WorkerMetrics, name: str, **labels) -> float:
    return worker_metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_committed_shard_adds_its_rows_errors_and_stage_seconds(observed):
    marker = ShardMarker(job_id="j", shard=0, parts={}, rows=10, errors=3, batch_size=8,
                         stats={"read_s": 1.5, "decode_s": 0.5, "compute_s": 2.0})
    with hooks.shard("embed") as events:
        assert sample(observed, "vitbatch_shards_in_flight") == 1
        events.committed(marker)
    assert sample(observed, "vitbatch_images_total", kind="embed", outcome="ok") == 7
    assert sample(observed, "vitbatch_images_total", kind="embed", outcome="error") == 3
    assert sample(observed, "vitbatch_stage_seconds_total", kind="embed", stage="read") == pytest.approx(1.5)
    assert sample(observed, "vitbatch_shard_duration_seconds_count", kind="embed") == 1
    assert sample(observed, "vitbatch_batch_size", kind="embed") == 8
    assert sample(observed, "vitbatch_shards_in_flight") == 0


def test_a_failed_shard_counts_as_not_committed_and_leaves_the_in_flight_gauge_at_rest(observed):
    with pytest.raises(OSError), hooks.shard("attention"):
        assert sample(observed, "vitbatch_shards_in_flight") == 1
        raise OSError("S3 went away")
    assert sample(observed, "vitbatch_shards_total", kind="attention", outcome="not_committed") == 1
    assert sample(observed, "vitbatch_shards_total", kind="attention", outcome="committed") == 0
    assert sample(observed, "vitbatch_shards_in_flight") == 0


class Model:
    """Stands for workers.models.LoadedModel: a plain (weak-referenceable) object."""


def test_only_a_real_model_load_is_observed_not_a_cache_hit(observed):
    cached = Model()
    assert hooks.loaded(lambda ref: cached, "ref") is cached
    assert hooks.loaded(lambda ref: cached, "ref") is cached  # the cache returns the same object
    assert sample(observed, "vitbatch_model_load_seconds_count") == 1
    hooks.loaded(lambda ref: Model(), "ref2")
    assert sample(observed, "vitbatch_model_load_seconds_count") == 2


def test_importing_the_shard_path_builds_no_registry_and_an_unheard_shard_still_runs():
    """The data path reports to hooks only; with no observer registered, nothing is counted anywhere."""
    import subprocess
    import sys

    code = "import sys, workers.runner, workers.heads; print('workers.metrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with hooks.shard("classify") as events:
        events.committed(ShardMarker(job_id="j", shard=0, parts={}, rows=1, errors=0))


def test_each_gpu_process_serves_on_the_base_port_plus_its_index():
    assert [metrics_port(9100, gpu, i) for i, gpu in enumerate(["0", "2", "5"])] == [9100, 9102, 9105]
    assert metrics_port(9100, "GPU-3f2a", 1) == 9101  # UUIDs: the position in the list
