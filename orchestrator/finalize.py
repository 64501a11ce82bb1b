"""Close a job once every shard has settled: publish its record (_SUCCESS.json or _FAILURES.json).

The record lists every committed part of this job (name, sha256, rows), read from this
job's own commit markers. Writing it at the prefix is the job's one atomic commit; only a
succeeded job replaces `_SUCCESS.json`, and only then are earlier jobs' folders removed.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from orchestrator import __version__
from orchestrator.constants import CARRIED_MARKER, FAILURES_FILE, SUCCESS_FILE, commit_name
from orchestrator.errors import StorageError
from orchestrator.ledger import JobState, Ledger, ShardState
from orchestrator.outputs import job_dir, read_json, remove_superseded, spec_digest
from orchestrator.storage import ObjectStore, join, relative_key



def stage_seconds(shard_stats: dict[int, dict]) -> dict[str, float]:
    """read/decode/compute/write seconds summed over shards (read and decode are thread-seconds)."""
    totals: dict[str, float] = {}
    for stats in shard_stats.values():
        for name, value in stats.items():
            if name.endswith("_s") and name != "images_per_s" and isinstance(value, (int, float)):
                totals[name] = round(totals.get(name, 0.0) + value, 4)
    return totals


def marker_parts(output: str, folder: str, marker: dict) -> list[dict]:
    """A marker's parts as record entries: names relative to the output prefix."""
    base = relative_key(output, folder)
    good_rows = marker.get("rows", 0) - marker.get("errors", 0)
    return [{"name": f"{base}/{name}", "sha256": part["sha256"], "bytes": part["bytes"],
             "shard": marker["shard"], "rows": marker.get("rows", 0) if name.endswith(".parquet") else good_rows}
            for name, part in sorted(marker["parts"].items())]


def committed_markers(job_id: str, output: str, ledger: Ledger, store: ObjectStore, carried: int) -> list[dict]:
    """This job's own commit markers, in shard order (carried-over rows first)."""
    folder = job_dir(output, job_id)
    names = [CARRIED_MARKER] if carried else []
    states = ledger.shard_states(job_id)
    names += [commit_name(i) for i in sorted(states) if states[i] is ShardState.COMMITTED]
    markers = []
    for name in names:
        marker = read_json(store, join(folder, name))
        if marker is None or marker.get("job_id") != job_id:
            raise StorageError(f"job {job_id}: commit marker {name} is missing from {folder}")
        markers.append(marker)
    return markers


def model_fields(markers: list[dict]) -> dict:
    """The model the shards ran, from their markers: one fingerprint, or every one if they differ."""
    seen = sorted({m["model_fingerprint"] for m in markers if m.get("model_fingerprint")})
    fields = {"model_fingerprint": seen[0] if len(seen) == 1 else ""}
    if len(seen) > 1:
        fields["model_fingerprints"] = seen
    return fields


def compute_fields(markers: list[dict]) -> dict:
    """Shards per way of computing them ("cpu fp32", "cuda fp16", "onnxruntime ..."): `auto`
    precision resolves on each worker, so a mixed fleet says so here instead of silently."""
    counts = Counter(marker["compute"] for marker in markers if marker.get("compute"))
    return {"computed_with": dict(sorted(counts.items()))} if counts else {}


def finalize(job_id: str, ledger: Ledger, store: ObjectStore) -> JobState:
    """Idempotent: whoever finalizes (the last worker, the reconciler, both at once) writes the
    same record, built only from the ledger and this job's markers."""
    status = ledger.status(job_id)
    if status.state in (JobState.CANCELLED, JobState.FAILED):
        return status.state
    folder = job_dir(status.output, job_id)
    markers = committed_markers(job_id, status.output, ledger, store, status.carried)
    finished = time.time()
    wall_s = finished - status.created_at
    summary = {
        "job_id": job_id, "spec_sha256": spec_digest(ledger.spec_json(job_id)), "kind": status.kind,
        "job_dir": relative_key(status.output, folder), "items": status.n_items, "processed": status.done,
        "carried_over": status.carried,
        "errors": status.errors, "shards": status.n_shards, "failed_shards": status.failed_shards,
        "wall_s": round(wall_s, 3), "images_per_s": round(status.done / max(wall_s, 1e-9), 2),
        "stage_seconds": stage_seconds(ledger.shard_stats(job_id)), **model_fields(markers),
        **compute_fields(markers),
        "vitbatch_version": __version__, "finished_at": finished,
        "parts": [part for marker in markers for part in marker_parts(status.output, folder, marker)],
    }
    state = JobState.SUCCEEDED if not status.failed_shards else JobState.FINISHED_WITH_FAILURES
    publish(store, status.output, summary, state is JobState.SUCCEEDED, json.loads(ledger.spec_json(job_id)))
    ledger.set_state(job_id, state, "" if state is JobState.SUCCEEDED else f"{len(status.failed_shards)} shard(s) failed")
    return state


def publish(store: ObjectStore, output: str, summary: dict, succeeded: bool, spec: dict) -> None:
    """Write the job's record in its folder, then at the prefix (the commit point readers follow).

    Only a success replaces `_SUCCESS.json`; it then removes earlier jobs' folders and
    moves the spec's alias (if any) to this output.
    """
    if summary["kind"] in ("finetune", "export"):
        summary = {**summary, "model": summary["job_dir"]}  # `--model <output>` loads this job's model
    name = SUCCESS_FILE if succeeded else FAILURES_FILE
    data = json.dumps(summary, indent=2).encode()
    store.write(join(output, summary["job_dir"], name), data)
    store.write(join(output, name), data)
    if succeeded:
        store.delete(join(output, FAILURES_FILE))  # a retry fixed what an earlier pass reported
        remove_superseded(output, summary["job_id"], store)
        if spec.get("alias"):  # nightly jobs that name this alias pick the new model up by themselves
            store.write(spec["alias"], output.encode())
