"""The in-memory ledger (what an in-process job is recorded in) holds to the ledger contract."""

from __future__ import annotations

import pytest
from ledger_contract import LedgerContract

from orchestrator.lifecycle.memoryledger import MemoryLedger


class TestMemoryLedger(LedgerContract):
    @pytest.fixture
    def ledger(self) -> MemoryLedger:
        return MemoryLedger()
