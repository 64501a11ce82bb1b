"""The commit protocol's records: one type per record, one writer of each file."""

from __future__ import annotations

import json

from orchestrator.config import Settings
from orchestrator.constants import JOB_SPEC_FILE, SUCCESS_FILE, commit_name
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.commits import (
    JobRecord,
    JobStamp,
    PartEntry,
    ShardMarker,
    ShardWork,
    Trained,
    read_marker,
    write_marker,
)
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.inprocess import run_local


def test_a_marker_round_trips_through_json_keeping_what_a_job_kind_adds(tmp_path):
    store, folder = ObjectStore(Settings()), normalize_uri(str(tmp_path))
    work = ShardWork(rows=5, errors=2, compute="cpu fp32", stats={"compute_s": 1.5},
                     outcome=Trained(val_accuracy=0.9, resumed_from_step=0))
    marker = ShardMarker.build(3, {"part-00003.parquet": PartEntry.of(b"rows")}, JobStamp("j1", "s"), work)
    write_marker(store, folder, marker)
    again = read_marker(store, folder, commit_name(3), "j1")
    assert again == marker and again.outcome_as(Trained).val_accuracy == 0.9 and again.good_rows == 3
    assert json.loads((tmp_path / commit_name(3)).read_text())["val_accuracy"] == 0.9  # flat, as markers always were
    assert read_marker(store, folder, commit_name(3), "another-job") is None  # a stale marker is not this job's


def test_the_in_process_path_writes_what_a_queued_job_writes(hf_model_dir, tmp_path):
    """The in-process path (workers/inprocess.py, then local.py) once wrote a record without carried_over,
    images_per_s, stage_seconds and computed_with, and no _job.json: the same JobRecord now writes both
    paths' records."""
    from orchestrator.stack.demo import write_digits

    write_digits(tmp_path / "in", limit=6)
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": str(hf_model_dir), "top_k": 1, "shard_size": 4, "device": "cpu"})
    job_id, markers = run_local(spec, WorkerContext(Settings()))
    record = json.loads((tmp_path / "out" / SUCCESS_FILE).read_text())
    merged = ("model_fingerprints", "figures", "model")  # written only when set: none for a classify job of one model
    keys = {f for f in JobRecord.__dataclass_fields__ if f not in merged} | {"images_per_s", "computed_with",
                                                                            "model_fingerprint"}
    assert keys <= set(record)
    assert record["processed"] == 6 and record["carried_over"] == 0 and record["shards"] == 2
    assert record["stage_seconds"]["compute_s"] > 0 and sum(record["computed_with"].values()) == 2
    for where in (tmp_path / "out" / JOB_SPEC_FILE, tmp_path / "out" / record["job_dir"] / JOB_SPEC_FILE):
        job = json.loads(where.read_text())
        assert job["job_id"] == job_id and job["spec_sha256"] == record["spec_sha256"]
        assert job["plan"]["items"] == 6
