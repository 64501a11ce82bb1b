"""`_job.json`: the record of a job as it was submitted, typed both ways.

It is written twice, with the same bytes: in the job's folder (its own record, which `recover`
rebuilds a lost job from) and at the output prefix (the job that last took the prefix). The queued
path (submit.py) and the in-process one (workers/inprocess.py) build it with the one
`incremental.submitted_job`, so both record what later readers need: a nightly run carries rows
over only from a job whose `model_identity` it can compare. Files written before a field existed
still read: a missing field takes its default. This module imports next to nothing, so every
reader (results, recover, vectorsource, incremental) can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.constants import JOB_SPEC_FILE
from orchestrator.errors import ObjectNotFound
from orchestrator.store.storage import ObjectStore, join


@dataclass(frozen=True)
class SubmittedJob:
    """One job as submitted (`_job.json`)."""

    job_id: str  # "" in a file that names none (never written so, but read all the same)
    spec_sha256: str  # of the spec's JSON as the ledger holds it (outputs.spec_digest)
    spec: dict[str, Any]  # the spec, as `parse_spec` reads it back
    plan: dict[str, Any] = field(default_factory=dict)  # the plan's summary: items, shards, carried and per-kind counts
    model_alias: str | None = None  # `--model alias:<uri>` as given; `spec.model` is what it named then
    model_identity: str | None = None  # the model's files and ETags (modelrefs.model_identity); image-shard kinds
    vitbatch_version: str = ""
    submitted_at: float = 0.0  # Unix seconds

    @property
    def items(self) -> int:
        return int(self.plan.get("items", 0))

    @property
    def shards(self) -> int:
        return int(self.plan.get("shards", 0))

    @property
    def carried(self) -> int:
        return int(self.plan.get("carried", 0))

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object; an unset alias or identity is left out, as it always was."""
        out: dict[str, Any] = {"job_id": self.job_id, "spec_sha256": self.spec_sha256, "spec": self.spec,
                               "plan": self.plan}
        if self.model_alias is not None:
            out["model_alias"] = self.model_alias
        if self.model_identity is not None:
            out["model_identity"] = self.model_identity
        return {**out, "vitbatch_version": self.vitbatch_version, "submitted_at": self.submitted_at}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubmittedJob:
        """The record in a file of any version: fields it lacks take their defaults, unknown ones are ignored."""
        return cls(
            job_id=str(data.get("job_id", "")), spec_sha256=str(data.get("spec_sha256", "")), spec=dict(data.get("spec") or {}),
            plan=dict(data.get("plan") or {}), model_alias=data.get("model_alias"),
            model_identity=data.get("model_identity"), vitbatch_version=str(data.get("vitbatch_version", "")),
            submitted_at=float(data.get("submitted_at", 0.0)),
        )


def read_submitted(store: ObjectStore, uri: str) -> SubmittedJob | None:
    """The `_job.json` at `uri`; None when there is none."""
    try:
        data = json.loads(store.read(uri))
    except ObjectNotFound:
        return None
    return SubmittedJob.from_json(data)


def prefix_holder(output: str, store: ObjectStore) -> SubmittedJob | None:
    """The record of the job that last took the prefix (`_job.json` at the prefix), if any."""
    return read_submitted(store, join(output, JOB_SPEC_FILE))
