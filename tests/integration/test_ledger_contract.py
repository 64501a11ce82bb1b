"""The Redis ledger holds to the ledger contract, against a real Redis-compatible server."""

from __future__ import annotations

import pytest
from ledger_contract import LedgerContract

from orchestrator.lifecycle.ledger import Ledger


class TestRedisLedger(LedgerContract):
    @pytest.fixture
    def ledger(self, redis_server) -> Ledger:
        return Ledger.from_url(redis_server.url(), job_ttl_s=3600)
