"""Job specs: what parse_spec accepts, how it normalizes, and how it refuses."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import SpecError
from orchestrator.jobspec.imagespecs import ClassifySpec
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.kinds import KINDS


@pytest.fixture
def spec_dict(tmp_path) -> dict:
    return {"kind": "classify", "input": str(tmp_path / "imgs"), "output": str(tmp_path / "out"),
            "model": "hf:google/vit-base"}


def refusal(data: dict | str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_a_valid_classify_spec_round_trips_through_json(tmp_path):
    spec = parse_spec({
        "kind": "classify", "input": str(tmp_path / "imgs") + "/", "output": "s3://bucket/out/run1/",
        "model": str(tmp_path / "model"), "batch_size": 8, "shard_size": 100, "top_k": 3,
        "precision": "fp16", "device": "cpu",
    })
    again = parse_spec(spec.model_dump_json())
    assert again == spec and isinstance(again, ClassifySpec)
    assert again.kind == "classify" and again.top_k == 3 and again.batch_size == 8


def test_json_text_and_a_dict_give_the_same_spec(spec_dict):
    assert parse_spec(json.dumps(spec_dict)) == parse_spec(spec_dict)


def test_an_unknown_kind_is_refused(spec_dict):
    message = refusal({**spec_dict, "kind": "segment"})
    assert "kind" in message


def test_an_unknown_extra_field_is_refused(spec_dict):
    message = refusal({**spec_dict, "batchsize": 32})
    assert "batchsize" in message


def test_batch_size_zero_is_refused(spec_dict):
    message = refusal({**spec_dict, "batch_size": 0})
    assert "batch_size" in message


@pytest.mark.parametrize("field", ["shard_size", "top_k", "read_concurrency"])
def test_non_positive_counts_are_refused(spec_dict, field):
    assert field in refusal({**spec_dict, field: 0})


@pytest.mark.parametrize("uri", ["ftp://x", "s3://", "s3:///no-bucket", "http://example.com/imgs"])
def test_malformed_or_unsupported_input_uris_are_refused(spec_dict, uri):
    assert "input:" in refusal({**spec_dict, "input": uri})


def test_a_malformed_output_uri_is_refused_naming_output(spec_dict):
    assert "output:" in refusal({**spec_dict, "output": "ftp://x/out"})


def test_a_file_uri_with_a_host_is_refused_not_silently_rerooted(spec_dict):
    # file://out/run1 reads as "the relative folder out/run1"; urlparse makes 'out' a host
    # and '/run1' the path, so accepting it would write to /run1.
    assert "output:" in refusal({**spec_dict, "output": "file://out/run1"})


def test_local_paths_normalize_to_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec({"kind": "classify", "input": "imgs/", "output": "out", "model": "hf:org/name"})
    assert spec.input == f"file://{tmp_path}/imgs/"
    assert spec.output == f"file://{tmp_path}/out"


def test_file_uris_are_kept_canonical(tmp_path):
    spec = parse_spec({"kind": "classify", "input": f"file://{tmp_path}/a%20b/", "output": f"file://{tmp_path}/o",
                       "model": "hf:o/n"})
    assert spec.input == f"file://{tmp_path}/a%20b/"


def test_a_hub_model_ref_is_kept_as_written(spec_dict):
    assert parse_spec({**spec_dict, "model": "hf:org/name"}).model == "hf:org/name"
    assert parse_spec({**spec_dict, "model": "timm:vit_base_patch16_224"}).model == "timm:vit_base_patch16_224"


def test_an_hf_local_dir_ref_becomes_an_absolute_file_uri(spec_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_spec({**spec_dict, "model": "hf:./local-dir/"}).model == f"hf:file://{tmp_path}/local-dir"


def test_a_plain_model_dir_becomes_an_absolute_file_uri(spec_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_spec({**spec_dict, "model": "models/vit/"}).model == f"file://{tmp_path}/models/vit"


def test_an_s3_model_dir_gets_one_trailing_slash(spec_dict):
    assert parse_spec({**spec_dict, "model": "s3://bucket/models/vit"}).model == "s3://bucket/models/vit/"


@pytest.mark.parametrize("ref", ["weird://x", "", "   ", "hf:", "hf:not a repo id!"])
def test_unusable_model_refs_are_refused_naming_model(spec_dict, ref):
    assert "model" in refusal({**spec_dict, "model": ref})


def test_a_spec_error_is_one_line_that_names_each_bad_field(spec_dict):
    message = refusal({**spec_dict, "batch_size": 0, "input": "ftp://x", "colour": "red"})
    assert "\n" not in message
    for field in ("batch_size", "input", "colour"):
        assert field in message


def test_every_schema_property_has_a_description():
    properties = ClassifySpec.model_json_schema()["properties"]
    assert {"input", "output", "model", "batch_size", "top_k"} <= set(properties)
    undocumented = [name for name, prop in properties.items() if not prop.get("description")]
    assert undocumented == []


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_job_kind_documents_every_option(kind):
    properties = KINDS[kind].spec.model_json_schema()["properties"]
    assert [name for name, prop in properties.items() if not prop.get("description")] == []
