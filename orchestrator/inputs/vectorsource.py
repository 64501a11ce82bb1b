"""An embed job's vectors as the input of dedup and neighbors jobs (pyarrow + numpy; no torch).

Resolved once at submit: the embed job's record (its latest succeeded job, or the job folder
named), the parts it lists for one array, and a check that the vectors are comparable at all
(one model, one normalization, one vector per image). Workers read exactly those parts,
checked against their sha256, never a listing.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from orchestrator.constants import JOB_SPEC_FILE, JOBS_DIR
from orchestrator.errors import OutputNotFound, SpecError
from orchestrator.jobspec.submitted import read_submitted
from orchestrator.lifecycle.commits import RecordPart
from orchestrator.published.outputs import job_dir
from orchestrator.published.results import array_parts, read_array_part, read_part, success_record
from orchestrator.store.storage import ObjectStore

_JOB_FOLDER = re.compile(rf"^(?P<output>.+)/{JOBS_DIR}/(?P<job>[^/]+)/?$")


@dataclass(frozen=True)
class VectorPart:
    """One embed shard: its index part, its array part (None: no good row) and the vectors it holds."""

    index: RecordPart
    array: RecordPart | None
    rows: int

    @classmethod
    def from_json(cls, data: dict) -> VectorPart:
        array = data.get("array")
        return cls(RecordPart.from_json(data["index"]), RecordPart.from_json(array) if array else None,
                   int(data["rows"]))


@dataclass(frozen=True)
class VectorSource:
    """The vectors of one embed job's array, part by part, as resolved at submit."""

    output: str
    job_id: str
    array: str
    input: str  # the embed job's --input: where the images (and so the keys) live
    parts: tuple[VectorPart, ...]
    model_fingerprint: str
    normalized: bool

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def offsets(self) -> np.ndarray:
        """Global row index of each part's first row (and the total at the end)."""
        return np.concatenate([[0], np.cumsum([part.rows for part in self.parts])]).astype(np.int64)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> VectorSource:
        return cls(**{**data, "parts": tuple(VectorPart.from_json(part) for part in data["parts"])})


def split_job_folder(uri: str) -> tuple[str, str | None]:
    """(output prefix, job id) for `<output>/_jobs/<id>/`; (uri, None) for a prefix."""
    match = _JOB_FOLDER.match(uri.rstrip("/"))
    return (match["output"], match["job"]) if match else (uri, None)


def resolve_vectors(uri: str, array: str, store: ObjectStore, option: str = "--embeddings") -> VectorSource:
    """The parts of `array` of the embed job at `uri`; SpecError saying why they cannot be compared."""
    output, job_id = split_job_folder(uri)
    try:
        record = success_record(output, store, job_id)
    except OutputNotFound as e:
        raise SpecError(f"{option} {uri}: {e}; pass an embed job's output prefix or its job folder") from e
    if record.kind != "embed":
        raise SpecError(f"{option} {uri} holds a {record.kind} job, not an embed job: run "
                        f"`vitbatch run embed --pooling {array} ...` first")
    submitted = read_submitted(store, f"{job_dir(output, record.job_id)}/{JOB_SPEC_FILE}")
    spec = submitted.spec if submitted is not None else {}
    if spec and array not in spec.get("pooling", []):
        raise SpecError(f"{option} {uri}: the embed job stored {', '.join(spec['pooling'])}, not {array}: pass "
                        f"--pooling {spec['pooling'][0]} or embed again with --pooling {array}")
    pairs = array_parts(record, array)
    parts = tuple(VectorPart(index, part, part.rows if part else 0) for index, part in pairs)
    if not any(part.rows for part in parts):
        raise SpecError(f"{option} {uri}: the embed job holds no {array} vectors (every image was an error row)")
    described = [describe(output, part.index, array, store) for part in parts if part.rows]
    recorded = record.model_fingerprints or [record.model_fingerprint]
    fingerprint, normalized = comparable(described, recorded, array, f"{option} {uri}")
    return VectorSource(output, record.job_id, array, spec.get("input", ""), parts, fingerprint, normalized)


def describe(output: str, index_part: RecordPart, array: str, store: ObjectStore) -> dict:
    """What the index part's metadata (`vitbatch.arrays`) says `array` is; {} for an older embed output."""
    schema = pq.read_schema(io.BytesIO(read_part(output, index_part, store)))
    arrays = json.loads((schema.metadata or {}).get(b"vitbatch.arrays", b"{}"))
    return arrays.get(array, {})


def comparable(described: list[dict], recorded: list[str], array: str, where: str) -> tuple[str, bool]:
    """(model fingerprint, normalized) when every part's vectors come from one model, one way; else SpecError.
    `recorded`: the fingerprints the job's record names, for an output whose parts do not say."""
    fingerprints = sorted({d.get("model_fingerprint", "") for d in described} - {""}) or recorded or [""]
    if len(fingerprints) > 1:
        raise SpecError(f"{where}: its {array} vectors come from {len(fingerprints)} different models "
                        f"({', '.join(f[:16] for f in fingerprints)}): cosines between them mean nothing; embed "
                        "the whole set again with one model")
    for field in ("normalized", "source", "projected", "family", "dtype"):
        values = {json.dumps(d.get(field)) for d in described if field in d}
        if len(values) > 1:
            raise SpecError(f"{where}: its {array} vectors differ in {field} ({', '.join(sorted(values))}) between "
                            "shards: embed the whole set again in one job")
    return fingerprints[0], bool(described and described[0].get("normalized"))


def read_vectors(source: VectorSource, part: int, store: ObjectStore) -> tuple[list[str], np.ndarray]:
    """(keys, float16 rows) of one embed part, both files checked against their sha256."""
    entry = source.parts[part]
    if not entry.rows:
        return [], np.zeros((0, 0), dtype=np.float16)
    keys, array = read_array_part(source.output, entry.index, entry.array, store)
    if array is None or array.ndim != 2:
        raise SpecError(f"{entry.index.name}: {source.array} is not one vector per image")
    return keys, array
