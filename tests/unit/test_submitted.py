"""`_job.json` through its type: one builder for both paths, read back the same, old files still read."""

from __future__ import annotations

import json

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import model_identity
from orchestrator.jobspec.submitted import SubmittedJob, read_submitted
from orchestrator.published.outputs import spec_digest
from orchestrator.store.storage import ObjectStore, normalize_uri
from orchestrator.submission.incremental import submitted_job


def test_a_record_reads_back_as_it_was_written(tmp_path):
    store = ObjectStore(Settings())
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": "hf:google/vit-base-patch16-224"})
    record = submitted_job("j1", spec, {"items": 3, "shards": 1, "carried": 0}, store, model_alias="alias:s3://b/m")
    uri = normalize_uri(str(tmp_path / "_job.json"))  # a plain path is not a store URI
    store.write(uri, record.to_bytes())
    assert read_submitted(store, uri) == record
    assert record.spec_sha256 == spec_digest(spec.model_dump_json())
    assert parse_spec(record.spec) == spec


def test_a_job_that_runs_image_shards_records_its_models_identity(tmp_path):
    store = ObjectStore(Settings())
    spec = parse_spec({"kind": "embed", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                       "model": "timm:vit_tiny_patch16_224"})
    assert submitted_job("j1", spec, {}, store).model_identity == model_identity(spec.model, store)


def test_a_job_over_vectors_records_no_model_identity(tmp_path):
    store = ObjectStore(Settings())
    spec = parse_spec({"kind": "dedup", "embeddings": str(tmp_path / "emb"), "output": str(tmp_path / "out")})
    record = submitted_job("j1", spec, {}, store)
    assert record.model_identity is None
    assert "model_identity" not in record.to_json() and "model_alias" not in record.to_json()


def test_a_file_written_before_a_field_existed_reads_with_its_default():
    old = {"job_id": "j0", "spec_sha256": "ab", "spec": {"kind": "classify"}, "plan": {"items": 5, "shards": 2},
           "submitted_at": 1700000000, "an_unknown_field": 1}
    record = SubmittedJob.from_json(old)
    assert (record.items, record.shards, record.carried) == (5, 2, 0)
    assert record.model_identity is None and record.model_alias is None and record.vitbatch_version == ""
    assert record.submitted_at == 1700000000.0


def test_the_json_keeps_the_fields_in_the_order_and_names_readers_know(tmp_path):
    record = SubmittedJob("j1", "ab", {"kind": "classify"}, {"items": 1}, "alias:x", "sha256:1", "0.9", 1.5)
    assert list(json.loads(record.to_bytes())) == ["job_id", "spec_sha256", "spec", "plan", "model_alias",
                                                  "model_identity", "vitbatch_version", "submitted_at"]
