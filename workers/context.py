"""WorkerContext: what a worker process holds for its whole life (the process-wide hub)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

from orchestrator.config import Settings
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.lifecycle.ledgers import JobLedger
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
    def ledger(self) -> JobLedger:
        """The Redis ledger at the settings' URL; an in-process job's context holds a memory one (`over`)."""
        return Ledger.from_settings(self.settings)

    def over(self, ledger: JobLedger) -> WorkerContext:
        """This context over another ledger, sharing its store, models and decode pool (what was built)."""
        for part in ("store", "models", "decode_pool"):  # built here (cheap, nothing started) so both share them
            getattr(self, part)
        twin = copy.copy(self)
        twin.__dict__["ledger"] = ledger  # cached_property's slot: read back as `twin.ledger`
        return twin

    @cached_property
    def models(self) -> ModelCache:
        return ModelCache(self.settings, self.store)

    @cached_property
    def decode_pool(self) -> DecodePool:
        return DecodePool(self.settings.decode_processes)
