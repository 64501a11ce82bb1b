"""WorkerContext: what a worker process holds for its whole life (the process-wide hub)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from orchestrator.config import Settings
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.store.storage import ObjectStore
from workers.decode.pool import DecodePool
from workers.models import ModelCache


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life: settings, store, ledger, models."""

    settings: Settings
    hostname: str = ""  # the Celery worker's name, recorded in commit markers

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger.from_settings(self.settings)

    @cached_property
    def models(self) -> ModelCache:
        return ModelCache(self.settings, self.store)

    @cached_property
    def decode_pool(self) -> DecodePool:
        return DecodePool(self.settings.decode_processes)
