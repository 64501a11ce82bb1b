"""A worker process's start: glibc keeps the activations a forward pass frees; the cyclic
collector neither walks a model while it is built nor keeps an evicted one."""

import gc
import os
import subprocess
import sys
import weakref

import pytest

from orchestrator.config import Settings
from orchestrator.store.storage import ObjectStore
from workers.memory import pause_collector, settle_heap
from workers.models import ModelCache

# Four 8 MiB buffers alive at once, then all freed, fifty times: the shape of a forward pass's
# activations. glibc's defaults hand the freed heap back to the kernel each time (it is more than
# twice the largest buffer), so each round faults megabytes in again; kept, the heap is reused.
ROUNDS = """
import resource, sys
import numpy as np
from workers.memory import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    buffers = [np.ones(8 << 20, dtype=np.uint8) for _ in range(4)]
    del buffers
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_is_not_faulted_in_again_every_round():
    tuned, kept = _faults("tune")
    _, default = _faults("default")
    assert tuned == "True"
    assert default > 50 * (4 << 20) // 4096  # the default faults megabytes in every round
    assert kept * 10 < default


def test_the_users_own_malloc_settings_stand():
    tuned, _ = _faults("tune", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert tuned == "False"


@pytest.fixture
def collector():
    """The collector as the test found it, and nothing left frozen for the tests after it."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def _collections_during(action) -> int:
    runs = []
    callback = lambda phase, info: runs.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        action()
    finally:
        gc.callbacks.remove(callback)
    return len(runs)


def _cache(capacity: int) -> ModelCache:
    settings = Settings()
    return ModelCache(settings, ObjectStore(settings), capacity=capacity)


def test_a_cached_model_is_built_without_collections_then_frozen(collector, hf_model_dir, timm_model_dir):
    cache = _cache(capacity=2)
    assert _collections_during(lambda: cache.get(str(hf_model_dir), "cpu", "fp32")) == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # what the load built is out of the collector's way
    assert _collections_during(lambda: [object() for _ in range(10_000)] and gc.collect()) == 1  # runs again


def test_an_evicted_model_is_freed_although_it_was_frozen(collector, hf_model_dir, timm_model_dir):
    cache = _cache(capacity=1)
    loaded = cache.get(str(hf_model_dir), "cpu", "fp32")
    # A worker's first load runs transformers' lazy imports, which leave the loading frame, and
    # so the module in it, in a reference cycle: only the collector frees that, and it never
    # looks at frozen objects. Here the cycle is made by hand; the next load freezes it.
    loaded.module.__dict__["_cycle"] = [loaded.module]
    first = weakref.ref(loaded.module)
    del loaded
    cache.get(str(timm_model_dir), "cpu", "fp32")  # evicts the first
    assert first() is None


def test_a_disabled_collector_stays_disabled(collector, hf_model_dir):
    gc.disable()
    _cache(capacity=1).get(str(hf_model_dir), "cpu", "fp32")
    assert not gc.isenabled()
    pause_collector()
    settle_heap()
    assert not gc.isenabled()


def test_the_worker_start_runs_without_collections_and_leaves_its_heap_frozen(collector):
    gc.enable()
    pause_collector()  # celeryd_init: before the task modules are imported
    assert _collections_during(lambda: [[object()] for _ in range(10_000)]) == 0
    settle_heap()  # worker_ready
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
