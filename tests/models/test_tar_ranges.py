"""img2dataset's webdataset shard sets named by a brace range: planned without listing, run in order; evaluate
and finetune read their labels through one too."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.inprocess import run_local


def write_tar(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
            info = tarfile.TarInfo(f"{seed:05d}{i:04d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))


def test_a_brace_range_plans_one_tar_shard_per_number_without_listing(tmp_path, hf_model_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in (0, 1, 3):  # 00002.tar is missing: an error row, not a failed job
        write_tar(shards / f"{number:05d}.tar", 3, number)
    (shards / "00099.tar").write_bytes(b"outside the range: never read")
    uri = normalize_uri(str(shards)) + "/{00000..00003}.tar"
    job_plan = plan(uri, 1000, ObjectStore(Settings()))
    assert [t.key for t in job_plan.tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]

    spec = parse_spec({"kind": "classify", "input": uri, "output": str(tmp_path / "out"), "model": str(hf_model_dir),
                       "device": "cpu", "top_k": 1})
    run_local(spec, WorkerContext(Settings()))
    rows = read_table(spec.output).to_pylist()
    good = [r["key"] for r in rows if r["error"] is None]
    assert len(good) == 9 and all(key.split("/")[0] in ("00000.tar", "00001.tar", "00003.tar") for key in good)
    missing = [r for r in rows if r["error"]]
    assert [r["key"] for r in missing] == ["00002.tar"] and "tar not read" in missing[0]["error"]


@pytest.mark.parametrize("pattern, why", [("{00000..00003}.jpg", "tar shards"), ("{00005..00001}.tar", "upwards")])
def test_a_brace_range_that_names_no_tars_or_runs_backwards_is_refused(tmp_path, pattern, why):
    with pytest.raises(SpecError, match=why):
        plan(normalize_uri(str(tmp_path)) + "/" + pattern, 1000, ObjectStore(Settings()))


def labeled_tar(path, labels: list[str], seed: int) -> None:
    """Samples `k.png` + `k.cls` (the label), as webdataset's TarWriter writes them."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i, label in enumerate(labels):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
            sink.write({"__key__": f"{seed:05d}{i:04d}", "png": buffer.getvalue(), "cls": label})


def test_evaluate_and_finetune_take_a_brace_range_of_labeled_tars(tmp_path, hf_model_dir):
    from helpers_models import LABELS

    from orchestrator.jobspec.checks.training import check_evaluate, check_finetune
    from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
    from workers.training.evaluation import evaluate
    from workers.training.finetune import finetune

    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(3):
        labeled_tar(shards / f"{number:05d}.tar", [LABELS[(number + i) % 2] for i in range(4)], number)
    uri = normalize_uri(str(shards)) + "/{00000..00002}.tar"
    store, ctx = ObjectStore(Settings()), WorkerContext(Settings())

    spec = EvaluateSpec(input=uri, model=str(hf_model_dir), output=str(tmp_path / "e"), device="cpu", precision="fp32")
    assert check_evaluate(spec, store) == {"items": 12, "classes": sorted(LABELS[:2])}
    evaluate(spec, "job-eval", ctx, lambda _: None)
    predictions = pq.read_table(tmp_path / "e" / "predictions.parquet").to_pylist()
    assert [r["key"] for r in predictions][:2] == ["00000.tar/000000000", "00000.tar/000000001"]
    assert [r["label"] for r in predictions] == [LABELS[(n + i) % 2] for n in range(3) for i in range(4)]

    tiny = {"image_size": 24, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}
    train = FinetuneSpec(train=uri, output=str(tmp_path / "m"), config=tiny, epochs=1, batch_size=4, augment="none",
                         val_split=0.25, device="cpu", precision="fp32")
    assert check_finetune(train, store)["train_images"] == 12
    result = finetune(train, "job-train", ctx, lambda _: None)
    assert result.errors == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(LABELS[:2])


def test_a_brace_range_of_labeled_tars_with_a_missing_number_is_refused_at_submit(tmp_path, hf_model_dir):
    from orchestrator.jobspec.checks.training import check_evaluate
    from orchestrator.jobspec.modelspecs import EvaluateSpec

    (tmp_path / "shards").mkdir()
    labeled_tar(tmp_path / "shards" / "00000.tar", ["cat", "dog"], 0)
    uri = normalize_uri(str(tmp_path / "shards")) + "/{00000..00001}.tar"
    spec = EvaluateSpec(input=uri, model=str(hf_model_dir), output=str(tmp_path / "e"), device="cpu")
    with pytest.raises(SpecError, match="1 of the 2 tars the range names do not exist.*00001.tar"):
        check_evaluate(spec, ObjectStore(Settings()))
