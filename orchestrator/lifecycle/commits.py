"""The commit protocol's records, typed, in one torch-free room: a shard's commit marker and a
job's published record, their JSON forms, and the one way each is written and read.

A shard writes its parts, then its marker (`_commits/part-NNNNN.json`) naming them with
their sha256: a marker's presence means the parts are whole. A job's record (`_SUCCESS.json`
or `_FAILURES.json`) lists every part of its markers; readers read exactly those parts. The
queued path (orchestrator/lifecycle/finalize.py), the in-process path (workers/inprocess.py) and
incremental carry-over build these same types, so the files they write cannot drift.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import commit_name
from orchestrator.errors import ObjectNotFound
from orchestrator.jobspec.kinds import job_kind
from orchestrator.store.storage import ObjectStore, join


@dataclass(frozen=True)
class PartEntry:
    """One file a marker names: its size and sha256."""

    bytes: int
    sha256: str

    @classmethod
    def of(cls, data: builtins.bytes) -> PartEntry:
        return cls(len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class ShardMarker:
    """A shard's (or a single-task job's) commit: which job wrote which parts, with what."""

    job_id: str
    shard: int | str  # "carried" for the rows incremental carry-over commits
    parts: dict[str, PartEntry]
    rows: int
    errors: int
    spec_sha256: str = ""
    committed_at: float = 0.0
    model_fingerprint: str = ""
    compute: str = ""  # "cpu fp32", "cuda fp16", "onnxruntime ...": `auto` resolves per worker
    worker: str = ""
    batch_size: int | None = None
    stats: dict[str, float] = field(default_factory=dict)  # <stage>_s seconds, items, wall_s ...
    extra: dict[str, Any] = field(default_factory=dict)  # what one job kind adds (val_accuracy, carried_from ...)

    @property
    def good_rows(self) -> int:
        return self.rows - self.errors

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("parts", "extra")}
        return {**out, "parts": {name: asdict(part) for name, part in self.parts.items()}, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> ShardMarker:
        """A marker from its JSON form; keys this type does not name are kept in `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["parts"] = {name: PartEntry(int(p["bytes"]), str(p["sha256"])) for name, p in data["parts"].items()}
        known["stats"] = dict(data.get("stats") or {})
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def build(cls, shard: int | str, parts: dict[str, PartEntry], summary: dict) -> ShardMarker:
        """A marker for `parts` from a shard's summary dict (job_id, rows, errors and what else it says)."""
        return cls.from_json({**summary, "shard": shard, "committed_at": time.time(),
                              "parts": {name: asdict(part) for name, part in parts.items()}})


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def upload_parts(store: ObjectStore, folder: str, parts: dict[str, bytes]) -> dict[str, PartEntry]:
    """Write each part into the job's folder; name -> PartEntry for the marker."""
    written = {}
    for name, data in parts.items():
        store.write(join(folder, name), data)
        written[name] = PartEntry.of(data)
    return written


def write_marker(store: ObjectStore, folder: str, marker: ShardMarker, name: str | None = None) -> ShardMarker:
    """The marker, last: after it, readers may take its parts as whole."""
    name = name or commit_name(int(marker.shard))
    store.write(join(folder, name), json.dumps(marker.to_json(), indent=2).encode())
    return marker


def read_marker(store: ObjectStore, folder: str, name: str, job_id: str) -> ShardMarker | None:
    """The marker when this job wrote it; None when it is missing or another job's (stale)."""
    try:
        data = json.loads(store.read(join(folder, name)))
    except ObjectNotFound:
        return None
    return ShardMarker.from_json(data) if isinstance(data, dict) and data.get("job_id") == job_id else None


# -- the job's record ------------------------------------------------------------------------
def marker_parts(output_relative_folder: str, marker: ShardMarker) -> list[dict]:
    """A marker's parts as record entries: names relative to the output prefix; a parquet part
    counts every row (error rows included), an array part the good rows only."""
    return [{"name": f"{output_relative_folder}/{name}", "sha256": part.sha256, "bytes": part.bytes,
             "shard": marker.shard, "rows": marker.rows if name.endswith(".parquet") else marker.good_rows}
            for name, part in sorted(marker.parts.items())]


def stage_seconds(shard_stats: Iterable[dict]) -> dict[str, float]:
    """read/decode/compute/write seconds summed over shards (read and decode are thread-seconds)."""
    totals: dict[str, float] = {}
    for stats in shard_stats:
        for name, value in stats.items():
            if name.endswith("_s") and name != "images_per_s" and isinstance(value, (int, float)):
                totals[name] = round(totals.get(name, 0.0) + value, 4)
    return totals


def model_fields(markers: list[ShardMarker]) -> dict:
    """The model the shards ran, from their markers: one fingerprint, or every one if they differ."""
    seen = sorted({m.model_fingerprint for m in markers if m.model_fingerprint})
    out: dict[str, Any] = {"model_fingerprint": seen[0] if len(seen) == 1 else ""}
    if len(seen) > 1:
        out["model_fingerprints"] = seen
    return out


def compute_fields(markers: list[ShardMarker]) -> dict:
    """Shards per way of computing them: `auto` precision resolves on each worker, so a mixed
    fleet says so here instead of silently."""
    counts: dict[str, int] = {}
    for marker in markers:
        if marker.compute:
            counts[marker.compute] = counts.get(marker.compute, 0) + 1
    return {"computed_with": dict(sorted(counts.items()))} if counts else {}


def kind_fields(markers: list[ShardMarker]) -> dict[str, Any]:
    """What a job's markers add to its record under `job_fields` (dedup's manifest shard: `dedup`, kept
    and removed per cluster; a neighbors job: `neighbors`, its mode, k and, approximate, its recall@k)."""
    out: dict[str, Any] = {}
    for marker in markers:
        out.update(marker.extra.get("job_fields") or {})
    return out


@dataclass(frozen=True)
class JobRecord:
    """What `_SUCCESS.json` / `_FAILURES.json` say about one job (see README "Outputs")."""

    job_id: str
    spec_sha256: str
    kind: str
    job_dir: str  # the job's folder, relative to the output prefix
    items: int
    processed: int
    carried_over: int
    errors: int
    shards: int
    failed_shards: dict[int, str]  # shard -> why it failed (JSON writes the shard as a string key)
    wall_s: float
    finished_at: float
    parts: list[dict]
    stage_seconds: dict[str, float]
    model_info: dict[str, Any]  # model_fingerprint(s) and computed_with, from the markers
    vitbatch_version: str
    kind_fields: dict[str, Any] = field(default_factory=dict)  # `dedup` or `neighbors`: see kind_fields()

    @property
    def images_per_s(self) -> float:
        return round(self.processed / max(self.wall_s, 1e-9), 2)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model_info", "kind_fields")}
        out["wall_s"] = round(self.wall_s, 3)
        out["images_per_s"] = self.images_per_s
        out.update(self.model_info)
        out.update(self.kind_fields)
        if job_kind(self.kind).makes_model:  # `--model <output>` loads this job's model
            out["model"] = self.job_dir
        return out

    @classmethod
    def build(cls, *, job_id: str, spec_sha256: str, kind: str, job_dir: str, markers: list[ShardMarker],
              items: int, processed: int, errors: int, shards: int, failed_shards: dict[int, str], carried: int,
              wall_s: float, finished_at: float, version: str, shard_stats: list[dict] | None = None) -> JobRecord:
        """The record of a job from its markers and counts (the ledger's for a queued job)."""
        return cls(
            job_id=job_id, spec_sha256=spec_sha256, kind=kind, job_dir=job_dir, items=items, processed=processed,
            carried_over=carried, errors=errors, shards=shards, failed_shards=dict(failed_shards), wall_s=wall_s,
            finished_at=finished_at,
            parts=[part for marker in markers for part in marker_parts(job_dir, marker)],
            stage_seconds=stage_seconds(shard_stats if shard_stats is not None else [m.stats for m in markers]),
            model_info={**model_fields(markers), **compute_fields(markers)}, vitbatch_version=version,
            kind_fields=kind_fields(markers),
        )
