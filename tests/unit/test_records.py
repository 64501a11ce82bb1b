"""Records typed both ways: commit markers and job records read from files as earlier versions wrote
them (tests/unit/records/: written by the code before markers and records had their own types), and
every reader of `_SUCCESS.json` goes through `JobRecord`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.constants import SUCCESS_FILE
from orchestrator.errors import CorruptOutput, OutputNotFound
from orchestrator.lifecycle.commits import (
    CarriedOver,
    JobRecord,
    RecordPart,
    ShardMarker,
    Trained,
    VectorShard,
)
from orchestrator.published.results import read_record, read_table, success_record
from orchestrator.store.storage import ObjectStore, normalize_uri

RECORDS = Path(__file__).parent / "records"


def old(name: str) -> dict:
    return json.loads((RECORDS / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDS.glob("marker-*.json")))
def test_a_marker_an_earlier_version_wrote_reads_and_writes_back_the_same_json(name):
    assert ShardMarker.from_json(old(name)).to_json() == old(name)


def test_an_old_index_marker_says_its_nprobe_and_whether_it_declined_through_its_type():
    index = ShardMarker.from_json(old("marker-neighbors-index.json")).outcome_as(VectorShard)
    declined = ShardMarker.from_json(old("marker-neighbors-index-declined.json")).outcome_as(VectorShard)
    assert (index.phase, index.nprobe, index.declined) == ("index", 8, None)
    assert (declined.nprobe, declined.declined) == (32, True)


def test_each_kind_s_marker_holds_its_own_outcome():
    assert ShardMarker.from_json(old("marker-finetune.json")).outcome == Trained(0.91, 0)
    assert ShardMarker.from_json(old("marker-carried.json")).outcome == CarriedOver("file:///data/out/run1")


def test_a_marker_asked_for_an_outcome_it_does_not_hold_says_so():
    with pytest.raises(CorruptOutput, match="holds no VectorShard"):
        ShardMarker.from_json(old("marker-finetune.json")).outcome_as(VectorShard)


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDS.glob("success-*.json")))
def test_a_record_an_earlier_version_wrote_reads_and_writes_back_the_same_json(name):
    assert JobRecord.from_json(old(name)).to_json() == old(name)
    assert list(JobRecord.from_json(old(name)).to_json()) == list(old(name))  # and its keys in their order


def test_an_old_record_reads_as_types_shard_numbers_included():
    record = JobRecord.from_json(old("success-classify-with-failures.json"))
    assert record.failed_shards == {2: "quarantined after 3 deliveries that did not commit"}  # JSON wrote "2"
    assert record.model_fingerprints == ["sha256:aaa", "sha256:bbb"] and record.model_fingerprint == ""
    assert record.parts[1] == RecordPart("_jobs/20261207-120000-abcdef/part-00001.parquet",
                                         record.parts[1].sha256, 2, 1, 2)
    assert [p.name for p in record.row_parts()] == [p.name for p in record.parts]
    neighbors = JobRecord.from_json(old("success-neighbors.json"))
    assert neighbors.figures["recall_at_k"] == 0.97 and neighbors.model == ""
    assert [p.name.rsplit("/", 1)[1] for p in neighbors.row_parts()] == ["part-00001.parquet"]
    finetune = JobRecord.from_json(old("success-finetune.json"))
    assert finetune.model == finetune.job_dir and finetune.figures == {}


# Before outputs had job folders (2026-11), _SUCCESS.json named the job but listed no parts.
BEFORE_JOB_FOLDERS = {"job_id": "20261101-010000-0a0b0c", "kind": "classify", "items": 3, "processed": 3,
                      "carried_over": 0, "errors": 0, "shards": 1, "failed_shards": {}, "wall_s": 1.0,
                      "images_per_s": 3.0, "stage_seconds": {}, "model_fingerprint": "sha256:m",
                      "vitbatch_version": "0.1.0", "finished_at": 1761958800.0}


def test_a_record_from_before_job_folders_reads_with_its_fields_defaulted():
    record = JobRecord.from_json(BEFORE_JOB_FOLDERS)
    assert (record.job_dir, record.parts, record.spec_sha256) == ("", [], "")
    assert record.images_per_s == 3.0 and record.model_fingerprint == "sha256:m"


def test_reading_an_output_from_before_job_folders_says_to_rerun_it(tmp_path):
    """The record named a job, so it was taken as current and its parts read by key: KeyError 'parts'."""
    (tmp_path / SUCCESS_FILE).write_text(json.dumps(BEFORE_JOB_FOLDERS))
    store, output = ObjectStore(Settings()), normalize_uri(str(tmp_path))
    with pytest.raises(OutputNotFound, match="older vitbatch.*--overwrite"):
        read_table(output, store)
    with pytest.raises(OutputNotFound, match="older vitbatch"):
        success_record(output, store)
    assert read_record(store, f"{output}/{SUCCESS_FILE}").job_id == BEFORE_JOB_FOLDERS["job_id"]


def test_a_nightly_run_over_an_output_from_before_job_folders_carries_nothing_over(tmp_path):
    """Its record has no job folder to find the previous `_job.json` in: it was read by key (KeyError
    'job_dir', the submit failed); now the run computes every image, as after a model change."""
    from orchestrator.submission.incremental import previous_identity

    (tmp_path / SUCCESS_FILE).write_text(json.dumps(BEFORE_JOB_FOLDERS))
    assert previous_identity(normalize_uri(str(tmp_path)), ObjectStore(Settings())) is None


def test_a_notebook_reads_the_record_by_its_plain_path_with_no_store(tmp_path):
    (tmp_path / SUCCESS_FILE).write_text((RECORDS / "success-neighbors.json").read_text())
    record = success_record(str(tmp_path))
    assert record == JobRecord.from_json(old("success-neighbors.json")) and record.figures["mode"] == "approximate"


def test_no_two_outcomes_and_no_outcome_and_marker_share_a_field_name():
    """A marker's JSON says which outcome it holds by the names of its keys, written flat beside the
    marker's own: a name two of them shared would read back as the wrong type."""
    from dataclasses import fields

    from orchestrator.lifecycle.commits import OUTCOMES

    names = [f.name for kind in OUTCOMES for f in fields(kind)]
    assert len(names) == len(set(names))
    assert not set(names) & {f.name for f in fields(ShardMarker)}
