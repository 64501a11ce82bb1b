"""Webdataset tars written by webdataset's own TarWriter, read back as webdataset reads them: one row per sample
(`x.jpg` + `x.seg.png` + `x.cls` is one sample, `img.v1.jpg` is sample `img`), each row's prediction that of its
image alone, labels and pass-through fields from the sample's members, keys by --id-column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds
from helpers_models import LABELS
from parquet_datasets import png
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.labels import load_labeled
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelspecs import EvaluateSpec
from orchestrator.published.results import read_table
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.inprocess import run_local
from workers.training.evaluation import evaluate


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def mask(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (44, 36 + seed), 255 * (seed % 2)).save(buffer, "PNG")
    return buffer.getvalue()


# A segmentation set: image, mask, class and metadata per sample; `b` holds dotted names (b.000.jpg, b.001.jpg),
# and the dotted keys img.v1 / img.v2 are one webdataset sample `img` (fields v1.jpg, v1.cls, v2.jpg, v2.cls).
SAMPLES = [
    {"__key__": "s0", "jpg": jpeg(0), "seg.png": mask(0), "cls": LABELS[1],
     "json": {"caption": "a grey cat", "uid": "u-0", "meta": {"w": 44}}, "txt": "text 0"},
    {"__key__": "s1", "png": png(1), "seg.png": mask(1), "cls": LABELS[2],
     "json": {"caption": "two dogs", "uid": "u-1", "meta": {"w": 45}}, "txt": "text 1"},
    {"__key__": "s2", "jpg": jpeg(2), "png": png(3), "cls": LABELS[0], "json": {"caption": "both", "uid": "u-2"}},
    {"__key__": "b", "000.jpg": jpeg(4), "001.jpg": jpeg(5), "cls": LABELS[3]},
    {"__key__": "img.v1", "jpg": jpeg(6), "cls": LABELS[0]},
    {"__key__": "img.v2", "jpg": jpeg(7), "cls": LABELS[1]},
]


def write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def as_webdataset_reads(path: Path) -> list[dict]:
    """The samples webdataset itself yields from the tar (raw bytes, no decoding)."""
    return list(wds.WebDataset(str(path), shardshuffle=False))


IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # webdataset's usual `to_tuple("jpg;jpeg;png;webp", ...)`


def image_of(sample: dict) -> str | None:
    return next((name for name in IMAGE_FIELDS if name in sample), None)


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def classify(source: Path, out: Path, model: Path, ctx: WorkerContext, **options) -> list[dict]:
    spec = parse_spec({"kind": "classify", "input": str(source), "output": str(out), "model": str(model),
                       "device": "cpu", "precision": "fp32", "top_k": 3, **options})
    run_local(spec, ctx)
    return read_table(spec.output).to_pylist()


def test_a_tarwriter_tar_is_one_row_per_sample_each_classified_as_its_image_alone(tmp_path, hf_model_dir, ctx):
    tar = write_tar(tmp_path / "wds" / "shard-000.tar", SAMPLES)
    samples = as_webdataset_reads(tar)
    assert [s["__key__"] for s in samples] == ["s0", "s1", "s2", "b", "img"]  # webdataset's own grouping
    files = tmp_path / "files"
    files.mkdir()
    for i, sample in enumerate(samples):  # each sample's image alone, as a file
        if (field := image_of(sample)) is not None:
            (files / f"{i}.{field}").write_bytes(sample[field])

    rows = classify(tar.parent, tmp_path / "o1", hf_model_dir, ctx)
    alone = {row["key"].split(".")[0]: row for row in classify(files, tmp_path / "o2", hf_model_dir, ctx)}

    assert [r["key"] for r in rows] == [f"shard-000.tar/{s['__key__']}" for s in samples]  # masks are no rows
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        if image_of(sample) is None:
            assert "has no image" in row["error"] and row["label"] is None
            continue
        assert row["error"] is None and row["topk_ids"] == alone[str(i)]["topk_ids"]
        assert row["topk_scores"] == pytest.approx(alone[str(i)]["topk_scores"], abs=1e-6)
    assert "000.jpg, 001.jpg" in rows[3]["error"] and "v1.jpg" in rows[4]["error"]


def test_image_key_names_the_field_each_row_is_classified_from(tmp_path, hf_model_dir, ctx):
    tar = write_tar(tmp_path / "wds" / "shard-000.tar", SAMPLES[:3])
    masks = tmp_path / "masks"
    masks.mkdir()
    for sample in SAMPLES[:2]:
        (masks / f"{sample['__key__']}.png").write_bytes(sample["seg.png"])
    rows = classify(tar.parent, tmp_path / "o1", hf_model_dir, ctx, image_key="seg.png")
    alone = classify(masks, tmp_path / "o2", hf_model_dir, ctx)
    assert [r["topk_ids"] for r in rows[:2]] == [r["topk_ids"] for r in alone]
    assert "sample 's2' has no image: it needs a 'seg.png' member" in rows[2]["error"]


def test_kept_fields_and_id_keys_come_from_each_samples_members_and_json(tmp_path, hf_model_dir, ctx):
    tar = write_tar(tmp_path / "wds" / "shard-000.tar", SAMPLES[:3])
    samples = as_webdataset_reads(tar)
    rows = classify(tar.parent, tmp_path / "o", hf_model_dir, ctx, id_column="json.uid",
                    keep_columns="cls,txt,caption,json.meta.w,seg.png,key")
    documents = [json.loads(s["json"]) for s in samples]
    assert [r["key"] for r in rows] == [d["uid"] for d in documents] == ["u-0", "u-1", "u-2"]
    assert [r["cls"] for r in rows] == [s["cls"].decode() for s in samples]
    assert [r["txt"] for r in rows] == [s["txt"].decode() if "txt" in s else None for s in samples]
    assert [r["caption"] for r in rows] == [d["caption"] for d in documents]
    assert [r["json.meta.w"] for r in rows] == ["44", "45", None]  # a JSON number, as text
    assert [r["seg.png"] for r in rows] == [s.get("seg.png") for s in samples]
    assert [r["input_key"] for r in rows] == [None] * 3  # no such field: null (`key` is the output's own)
    assert all(r["error"] is None for r in rows)
    schema = read_table(normalize_uri(str(tmp_path / "o"))).schema
    assert (schema.field("cls").type, schema.field("seg.png").type) == (pa.string(), pa.binary())


def test_a_sample_without_its_id_field_is_an_error_row_under_its_sample_key(tmp_path, hf_model_dir, ctx):
    tar = write_tar(tmp_path / "wds" / "shard-000.tar", [SAMPLES[0], {"__key__": "s9", "png": png(9)}])
    rows = classify(tar.parent, tmp_path / "o", hf_model_dir, ctx, id_column="uid")
    assert [r["key"] for r in rows] == ["u-0", "shard-000.tar/s9"]
    assert rows[0]["error"] is None and "--id-column 'uid' is empty" in rows[1]["error"]


def test_evaluate_reads_each_sample_once_with_its_own_label_never_its_mask(tmp_path, hf_model_dir, ctx):
    write_tar(tmp_path / "wds" / "shard-000.tar", SAMPLES[:3])
    spec = EvaluateSpec(input=str(tmp_path / "wds"), model=str(hf_model_dir), output=str(tmp_path / "e"),
                        device="cpu", precision="fp32")
    evaluate(spec, "job-eval", ctx, lambda _: None)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and metrics["n_errors"] == 0
    predictions = read_table_file(tmp_path / "e" / "predictions.parquet")
    assert [r["key"] for r in predictions] == ["shard-000.tar/s0", "shard-000.tar/s1", "shard-000.tar/s2"]
    assert [r["label"] for r in predictions] == [LABELS[1], LABELS[2], LABELS[0]]


def test_dotted_member_names_are_one_sample_so_their_labels_are_refused_not_guessed(tmp_path):
    """img.v1.jpg and img.v2.jpg are fields of one sample `img` (webdataset's rule): training on them
    would pair an image with a label it does not have, so submit says why instead."""
    write_tar(tmp_path / "wds" / "shard-000.tar", SAMPLES[:2] + SAMPLES[4:])
    with pytest.raises(SpecError, match="sample 'img' has no image.*v1.jpg"):
        load_labeled(normalize_uri(str(tmp_path / "wds")), ObjectStore(Settings()))


def read_table_file(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
