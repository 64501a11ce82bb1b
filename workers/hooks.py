"""What the shard path tells whoever listens: cross-cutting concerns register at worker boot.

The data path (runner.run_shard, jobheads.for_job) reports a shard's start and end and a model's
load here and imports no metrics registry; the worker's Prometheus metrics
(`workers.metrics.WorkerMetrics`) are built in the worker process at boot and registered as an
observer, the way a task queue's Prometheus middleware is added to its broker. With nothing
registered (tests, bench/, the in-process run) an event is a loop over an empty list.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from orchestrator.lifecycle.commits import ShardMarker

Model = TypeVar("Model")


class ShardObserver(Protocol):
    """Hears the shard path's events; must not raise (an observer never fails a shard)."""

    def shard_started(self, kind: str) -> None: ...

    def shard_ended(self, kind: str, marker: ShardMarker | None, duration_s: float) -> None:
        """`marker` is None when the shard did not commit (an error that will be retried, a cancel)."""

    def model_loaded(self, seconds: float) -> None: ...


_observers: list[ShardObserver] = []


def register(observer: ShardObserver) -> None:
    if observer not in _observers:
        _observers.append(observer)


def unregister(observer: ShardObserver) -> None:
    if observer in _observers:
        _observers.remove(observer)


@dataclass
class ShardEvents:
    """Handed to the shard's body: it says `committed(marker)` once the commit marker is written."""

    kind: str
    marker: ShardMarker | None = None

    def committed(self, marker: ShardMarker) -> ShardMarker:
        self.marker = marker
        return marker


@contextmanager
def shard(kind: str) -> Iterator[ShardEvents]:
    """Around one shard's work: started now, ended (committed or not) when the block leaves."""
    for observer in _observers:
        observer.shard_started(kind)
    events, started = ShardEvents(kind), time.perf_counter()
    try:
        yield events
    finally:
        for observer in _observers:
            observer.shard_ended(kind, events.marker, time.perf_counter() - started)


_seen_models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a model already reported


def loaded(get: Callable[..., Model], *args, **kwargs) -> Model:
    """`get(*args, **kwargs)` (ModelCache.get), reported as a load only when it returned a model not seen
    before: cache hits take microseconds and would hide the real loads."""
    started = time.perf_counter()
    model = get(*args, **kwargs)
    if _seen_models.get(id(model)) is not model:
        seconds = time.perf_counter() - started
        try:
            _seen_models[id(model)] = model
        except TypeError:  # not weak-referenceable: every call counts as a load, the shard goes on
            pass
        for observer in _observers:
            observer.model_loaded(seconds)
    return model
