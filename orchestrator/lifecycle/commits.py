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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import commit_name
from orchestrator.errors import CorruptOutput, ObjectNotFound
from orchestrator.store.storage import ObjectStore, join


@dataclass(frozen=True)
class PartEntry:
    """One file a marker names: its size and sha256."""

    bytes: int
    sha256: str

    @classmethod
    def of(cls, data: builtins.bytes) -> PartEntry:
        return cls(len(data), hashlib.sha256(data).hexdigest())


# -- what one kind adds to its markers ----------------------------------------------------------
# Each kind's fields are one small type, written flat beside the marker's own fields (as markers
# have always been written); their names do not overlap, so a marker's JSON says which it holds.


@dataclass(frozen=True)
class CarriedOver:
    """Incremental carry-over's marker: the output whose unchanged rows it commits again."""

    carried_from: str


@dataclass(frozen=True)
class Trained:
    """A finetune's marker: its final validation accuracy (None without a validation split) and the
    checkpoint step it resumed from."""

    val_accuracy: float | None = None
    resumed_from_step: int | None = None


@dataclass(frozen=True)
class Evaluated:
    """An evaluate job's marker: its top-1 accuracy."""

    accuracy: float


@dataclass(frozen=True)
class Exported:
    """An export's marker: the parity figures per precision checked (workers/onnx/parity.py)."""

    parity: dict[str, Any]


@dataclass(frozen=True)
class VectorShard:
    """A dedup or neighbors shard's marker: its phase and what that phase found. Only the phase
    that found a figure writes it; `job_fields` is what the job's record adds under the kind's name
    (dedup's manifest shard: kept and removed per cluster; neighbors: mode, k, recall)."""

    phase: str
    mode: str | None = None  # neighbors' search blocks: exact or approximate
    sample_rows: int | None = None  # dedup's fit: rows k-means was fitted on
    visits: int | None = None  # dedup's assign: visits of near other clusters
    removed_in_clusters: int | None = None  # dedup's pairs
    cross_pairs: int | None = None  # dedup's pairs: pairs found across clusters (the manifest resolves them)
    lists: int | None = None  # neighbors' index: inverted lists
    nprobe: int | None = None  # neighbors' index: lists a search scans
    declined: bool | None = None  # neighbors' index under --mode auto: no index, the blocks search exactly
    job_fields: dict[str, dict[str, Any]] | None = None


Outcome = CarriedOver | Trained | Evaluated | Exported | VectorShard
OUTCOMES: tuple[type[Outcome], ...] = (CarriedOver, Trained, Evaluated, Exported, VectorShard)
OutcomeT = TypeVar("OutcomeT", CarriedOver, Trained, Evaluated, Exported, VectorShard)


def outcome_json(outcome: Outcome | None) -> dict[str, Any]:
    """An outcome's flat JSON keys; a figure its phase did not find (None) is left out."""
    return {} if outcome is None else {k: v for k, v in asdict(outcome).items() if v is not None}


def outcome_from_json(data: dict[str, Any]) -> Outcome | None:
    """The outcome a marker's JSON holds (the type one of whose fields it names), or None."""
    for outcome_type in OUTCOMES:
        names = {f.name for f in fields(outcome_type)}
        if names & data.keys():
            return outcome_type(**{k: v for k, v in data.items() if k in names})
    return None


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
    stats: dict[str, float | str] = field(default_factory=dict)  # <stage>_s seconds, items, wall_s, a precision ...
    outcome: Outcome | None = None  # what one job kind adds (CarriedOver, Trained, ..., VectorShard)

    @property
    def good_rows(self) -> int:
        return self.rows - self.errors

    def outcome_as(self, wanted: type[OutcomeT]) -> OutcomeT:
        """The marker's outcome as the type its reader needs; CorruptOutput when it holds another."""
        if not isinstance(self.outcome, wanted):
            raise CorruptOutput(f"job {self.job_id}: the marker of shard {self.shard} holds no {wanted.__name__} "
                                f"({type(self.outcome).__name__}): rerun the job")
        return self.outcome

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("parts", "outcome")}
        out["parts"] = {name: asdict(part) for name, part in self.parts.items()}
        return {**out, **outcome_json(self.outcome)}

    @classmethod
    def from_json(cls, data: dict) -> ShardMarker:
        """A marker from its JSON form, as any version wrote it: the kind's keys become its outcome;
        keys no type names are ignored."""
        names = {f.name for f in fields(cls)} - {"outcome"}
        known = {k: v for k, v in data.items() if k in names}
        known["parts"] = {name: PartEntry(int(p["bytes"]), str(p["sha256"])) for name, p in data["parts"].items()}
        known["stats"] = dict(data.get("stats") or {})
        return cls(**known, outcome=outcome_from_json(data))

    @classmethod
    def build(cls, shard: int | str, parts: dict[str, PartEntry], stamp: JobStamp, work: ShardWork) -> ShardMarker:
        """The marker of `parts`, committed now, for the job `stamp` names, from what its work reported."""
        return cls(job_id=stamp.job_id, shard=shard, parts=parts, rows=work.rows, errors=work.errors,
                   spec_sha256=stamp.spec_sha256, committed_at=time.time(), model_fingerprint=work.model_fingerprint,
                   compute=work.compute, worker=work.worker, batch_size=work.batch_size, stats=dict(work.stats),
                   outcome=work.outcome)


@dataclass(frozen=True)
class JobStamp:
    """What names a job in each of its markers: its id and its spec's digest (outputs.spec_digest)."""

    job_id: str
    spec_sha256: str = ""


@dataclass(frozen=True)
class ShardWork:
    """What a shard's (or a single task's) work reports for its marker."""

    rows: int
    errors: int = 0
    model_fingerprint: str = ""
    compute: str = ""
    worker: str = ""
    batch_size: int | None = None  # after any out-of-memory halving
    stats: Mapping[str, float | str] = field(default_factory=dict)  # becomes ShardMarker.stats
    outcome: Outcome | None = None


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
@dataclass(frozen=True)
class RecordPart:
    """One part a job's record lists, the only files its readers read: its name relative to the
    output prefix, sha256 and size, its shard, and its rows (a parquet part counts every row,
    error rows included; an array part the good rows only)."""

    name: str
    sha256: str
    bytes: int
    shard: int | str
    rows: int

    @property
    def in_subfolder(self) -> bool:
        """An array, overlay or phase file (`_jobs/<id>/cls/part-00000.npy`), not a shard's rows."""
        return "/" in self.name.split("/", 2)[2]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordPart:
        return cls(name=str(data["name"]), sha256=str(data["sha256"]), bytes=int(data.get("bytes", 0)),
                   shard=data.get("shard", ""), rows=int(data.get("rows", 0)))


def marker_parts(output_relative_folder: str, marker: ShardMarker) -> list[RecordPart]:
    """A marker's parts as the record lists them, named relative to the output prefix."""
    return [RecordPart(f"{output_relative_folder}/{name}", part.sha256, part.bytes, marker.shard,
                       marker.rows if name.endswith(".parquet") else marker.good_rows)
            for name, part in sorted(marker.parts.items())]


def stage_seconds(shard_stats: Iterable[dict]) -> dict[str, float]:
    """read/decode/compute/write seconds summed over shards (read and decode are thread-seconds)."""
    totals: dict[str, float] = {}
    for stats in shard_stats:
        for name, value in stats.items():
            if name.endswith("_s") and name != "images_per_s" and isinstance(value, (int, float)):
                totals[name] = round(totals.get(name, 0.0) + value, 4)
    return totals


def fingerprints(markers: list[ShardMarker]) -> list[str]:
    """Every model fingerprint the shards ran with (one, unless a fleet's models differed)."""
    return sorted({m.model_fingerprint for m in markers if m.model_fingerprint})


def computed_with(markers: list[ShardMarker]) -> dict[str, int]:
    """Shards per way of computing them: `auto` precision resolves on each worker, so a mixed
    fleet says so here instead of silently."""
    counts: dict[str, int] = {}
    for marker in markers:
        if marker.compute:
            counts[marker.compute] = counts.get(marker.compute, 0) + 1
    return dict(sorted(counts.items()))


def kind_figures(markers: list[ShardMarker], kind: str) -> dict[str, Any]:
    """What a job's markers add to its record under the kind's name (dedup's manifest shard: kept and
    removed per cluster; a neighbors job: its mode, k and, approximate, its recall@k)."""
    out: dict[str, Any] = {}
    for marker in markers:
        if isinstance(marker.outcome, VectorShard) and marker.outcome.job_fields:
            out.update(marker.outcome.job_fields.get(kind) or {})
    return out


_AFTER_THE_COUNTS = (  # the model and the kind's figures: each written only when set
    "model_fingerprint", "model_fingerprints", "computed_with", "figures", "model")


@dataclass(frozen=True)
class JobRecord:
    """What `_SUCCESS.json` / `_FAILURES.json` say about one job (see README "Outputs"), typed both
    ways: `build` from the job's markers and counts, `from_json` from a record any version wrote."""

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
    parts: list[RecordPart]
    stage_seconds: dict[str, float]
    vitbatch_version: str
    images_per_s: float
    model_fingerprint: str = ""  # "" when the shards' models differed: then model_fingerprints names each
    model_fingerprints: list[str] = field(default_factory=list)
    computed_with: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # what the kind adds, under its name (dedup, neighbors)
    model: str = ""  # a job whose output is a model: its folder, which `--model <output>` loads

    def to_json(self) -> dict:
        """The file's JSON object, keys in the order records have always had; empty extras left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _AFTER_THE_COUNTS}
        out["failed_shards"] = {str(shard): why for shard, why in self.failed_shards.items()}
        out["parts"] = [asdict(part) for part in self.parts]
        out["model_fingerprint"] = self.model_fingerprint  # written even when "" (the models differed)
        if self.model_fingerprints:
            out["model_fingerprints"] = self.model_fingerprints
        if self.computed_with:
            out["computed_with"] = self.computed_with
        if self.figures:
            out[self.kind] = self.figures
        if self.model:
            out["model"] = self.model
        return out

    def to_bytes(self) -> builtins.bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    def row_parts(self) -> list[RecordPart]:
        """The row-holding parquet parts (one per shard, plus carried-over rows): what `read_table` reads
        and the Delta table holds; array and phase files live in subfolders."""
        return [part for part in self.parts if part.name.endswith(".parquet") and not part.in_subfolder]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """The record in a file of any version: a field it lacks takes its default (a missing job id
        is "": results.success_record refuses such a record), keys no field names are ignored."""
        kind = str(data.get("kind", ""))
        figures = data.get(kind) if kind else None
        prints = data.get("model_fingerprints") or []
        return cls(
            job_id=str(data.get("job_id", "")), spec_sha256=str(data.get("spec_sha256", "")), kind=kind,
            job_dir=str(data.get("job_dir", "")), items=int(data.get("items", 0)),
            processed=int(data.get("processed", 0)), carried_over=int(data.get("carried_over", 0)),
            errors=int(data.get("errors", 0)), shards=int(data.get("shards", 0)),
            failed_shards={int(shard): str(why) for shard, why in (data.get("failed_shards") or {}).items()},
            wall_s=float(data.get("wall_s", 0.0)), finished_at=float(data.get("finished_at", 0.0)),
            parts=[RecordPart.from_json(part) for part in data.get("parts") or []],
            stage_seconds=dict(data.get("stage_seconds") or {}), vitbatch_version=str(data.get("vitbatch_version", "")),
            images_per_s=float(data.get("images_per_s", 0.0)), model_fingerprint=str(data.get("model_fingerprint", "")),
            model_fingerprints=[str(p) for p in prints], computed_with=dict(data.get("computed_with") or {}),
            figures=dict(figures) if isinstance(figures, dict) else {}, model=str(data.get("model") or ""),
        )

    @classmethod
    def build(cls, *, job_id: str, spec_sha256: str, kind: str, job_dir: str, markers: list[ShardMarker],
              items: int, processed: int, errors: int, shards: int, failed_shards: dict[int, str], carried: int,
              wall_s: float, finished_at: float, version: str, shard_stats: list[dict] | None = None,
              makes_model: bool = False) -> JobRecord:
        """The record of a job from its markers and counts (the ledger's for a queued job); `makes_model`:
        the kind's trait (kinds.JobKind), so that the record names the job's folder as its model."""
        prints = fingerprints(markers)
        return cls(
            job_id=job_id, spec_sha256=spec_sha256, kind=kind, job_dir=job_dir, items=items, processed=processed,
            carried_over=carried, errors=errors, shards=shards, failed_shards=dict(failed_shards),
            wall_s=round(wall_s, 3), finished_at=finished_at,
            parts=[part for marker in markers for part in marker_parts(job_dir, marker)],
            stage_seconds=stage_seconds(shard_stats if shard_stats is not None else [m.stats for m in markers]),
            vitbatch_version=version, images_per_s=round(processed / max(wall_s, 1e-9), 2),
            model_fingerprint=prints[0] if len(prints) == 1 else "", model_fingerprints=prints if len(prints) > 1 else [],
            computed_with=computed_with(markers), figures=kind_figures(markers, kind),
            model=job_dir if makes_model else "",  # `--model <output>` loads this job's model
        )
