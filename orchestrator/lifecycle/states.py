"""Job and shard states, and the status a job reports (`vitbatch status`, the exporter, finalize)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FINISHED_WITH_FAILURES = "finished_with_failures"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class ShardState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass
class JobStatus:
    job_id: str
    kind: str
    state: JobState
    output: str
    n_items: int
    n_shards: int
    done: int
    errors: int
    shards: dict[str, int]
    failed_shards: dict[int, str] = field(default_factory=dict)
    reason: str = ""
    requeued: int = 0
    carried: int = 0
    created_at: float = 0.0
    finished_at: float = 0.0

    @property
    def images_per_s(self) -> float:
        end = self.finished_at or time.time()
        return self.done / max(end - self.created_at, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far: 0 once ended or all done; None before the first item (no rate yet)."""
        left = max(0, self.n_items - self.done)
        if self.state.terminal or not left:
            return 0.0
        rate = self.images_per_s
        return left / rate if rate > 0 else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.value
        out["images_per_s"] = round(self.images_per_s, 2)
        out["eta_s"] = None if self.eta_s is None else round(self.eta_s, 1)
        return out
