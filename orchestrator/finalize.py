"""Close a job once every shard has settled: write _SUCCESS.json (or _FAILURES.json)."""

from __future__ import annotations

import json
import time

from orchestrator import __version__
from orchestrator.constants import SUCCESS_FILE
from orchestrator.ledger import JobState, Ledger
from orchestrator.storage import ObjectStore, join

FAILURES_FILE = "_FAILURES.json"


def stage_seconds(shard_stats: dict[int, dict]) -> dict[str, float]:
    """read/decode/compute/write seconds summed over shards (read and decode are thread-seconds)."""
    totals: dict[str, float] = {}
    for stats in shard_stats.values():
        for name, value in stats.items():
            if name.endswith("_s") and name != "images_per_s" and isinstance(value, (int, float)):
                totals[name] = round(totals.get(name, 0.0) + value, 4)
    return totals


def finalize(job_id: str, ledger: Ledger, store: ObjectStore, model_fingerprint: str = "") -> JobState:
    """Idempotent: two workers finishing the last shards at once write the same summary."""
    status = ledger.status(job_id)
    if status.state in (JobState.CANCELLED, JobState.FAILED):
        return status.state
    stage_totals = stage_seconds(ledger.shard_stats(job_id))
    finished = time.time()
    wall_s = finished - status.created_at
    summary = {
        "job_id": job_id, "kind": status.kind, "items": status.n_items, "processed": status.done,
        "carried_over": status.carried,
        "errors": status.errors, "shards": status.n_shards, "failed_shards": status.failed_shards,
        "wall_s": round(wall_s, 3), "images_per_s": round(status.done / max(wall_s, 1e-9), 2),
        "stage_seconds": stage_totals, "model_fingerprint": model_fingerprint,
        "vitbatch_version": __version__, "finished_at": finished,
    }
    state = JobState.SUCCEEDED if not status.failed_shards else JobState.FINISHED_WITH_FAILURES
    name = SUCCESS_FILE if state is JobState.SUCCEEDED else FAILURES_FILE
    store.write(join(status.output, name), json.dumps(summary, indent=2).encode())
    if state is JobState.SUCCEEDED:
        store.delete(join(status.output, FAILURES_FILE))  # a retry fixed what an earlier pass reported
    ledger.set_state(job_id, state, "" if state is JobState.SUCCEEDED else f"{len(status.failed_shards)} shard(s) failed")
    return state
