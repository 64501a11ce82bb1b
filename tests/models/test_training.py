"""finetune and evaluate in-process on real handwritten digits, with tiny ViTs built on the CPU."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import ObjectNotFound, SpecError
from orchestrator.inputs.labeledsources import LabeledItem
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.modelkinds import ModelKind
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.lifecycle.commits import Evaluated, ShardWork
from orchestrator.stack.demo import write_digits
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.decode.preprocess import Decoder, Preprocess
from workers.errors import TrainingDiverged
from workers.heads import ClassifyHead
from workers.pipeline import DecodePath
from workers.runner import run_with
from workers.stagetimes import StageTimes
from workers.training.datasets import LabeledImages, transforms
from workers.training.evaluation import evaluate
from workers.training.finetune import finetune

# Two layers learn 400 digits faster than four: 62-70% val accuracy over seeds 0-2 after 20 epochs.
TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128}
EPOCHS = 20
TINY_TIMM = {"architecture": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32,
             "depth": 2, "num_heads": 2}
DIGITS = [str(d) for d in range(10)]
BROKEN = "3/broken.png"


class Crash(Exception):
    """Stands in for the worker process dying mid-training."""


def ignore(_: dict) -> None:
    pass


def make_spec(train: Path, output: Path, **overrides) -> FinetuneSpec:
    options = {"config": TINY_VIT, "epochs": 1, "lr": 1e-3, "batch_size": 16, "augment": "none",
               "checkpoint_every_steps": 1000, "warmup_ratio": 0.05, **overrides}
    return FinetuneSpec(train=str(train), output=str(output), **options)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Test machines are small and shared: OpenMP threads that spin-wait for a busy core
    made these tiny models train 5-10x slower with 2 threads than with 1 (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """400 real digits, plus one file that is not an image at all."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, limit=400)
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


@pytest.fixture(scope="module")
def trained(digits, ctx, tmp_path_factory) -> tuple[FinetuneSpec, ShardWork, Path, list[dict]]:
    output = tmp_path_factory.mktemp("trained")
    reports: list[dict] = []
    spec = make_spec(digits, output, epochs=EPOCHS)
    result = finetune(spec, "job-train", ctx, reports.append)
    return spec, result, output, reports


def test_a_tiny_vit_from_scratch_learns_digits_well_above_chance(trained):
    _, result, output, _ = trained
    assert result.outcome.val_accuracy > 0.5  # chance is 0.1
    assert result.rows == EPOCHS * 360 and result.errors == 1 and result.outcome.resumed_from_step == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["skipped"] == [{"key": BROKEN, "reason": metrics["skipped"][0]["reason"]}]
    assert "Truncated" in metrics["skipped"][0]["reason"]
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, EPOCHS + 1))
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert Image.open(output / "training_curve.png").size[0] > 100


def test_progress_reports_count_images_towards_the_total(trained):
    reports = trained[3]
    steps = [r for r in reports if "loss" in r]
    assert steps and steps[-1]["done"] == steps[-1]["total"] == EPOCHS * 360
    assert all(r["images_per_s"] > 0 for r in steps)
    evals = [r for r in reports if "val_accuracy" in r]
    assert len(evals) == EPOCHS and all(r["done"] == r["epoch"] * 360 for r in evals)


def test_the_output_loads_with_transformers_and_with_workers(trained):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _, result, output, _ = trained
    hf = AutoModelForImageClassification.from_pretrained(output)
    assert hf.config.id2label == dict(enumerate(DIGITS))
    assert AutoImageProcessor.from_pretrained(output).size == {"height": 32, "width": 32}
    loaded = load_model(normalize_model_ref(str(output)), device="cpu")
    assert loaded.id2label == dict(enumerate(DIGITS))
    assert loaded.fingerprint == result.model_fingerprint


def test_classify_pipeline_predicts_what_transformers_predicts(trained, digits):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _, _, output, _ = trained
    items = [i for i in plan(normalize_uri(str(digits)), 1000, ObjectStore(Settings())).items if "broken" not in i.key]
    items = items[::20]
    loaded = load_model(normalize_model_ref(str(output)), device="cpu")
    head = ClassifyHead(loaded, 0, top_k=1)
    run_with(loaded, ObjectStore(Settings()), items, head, DecodePath(Decoder(loaded.prep, 1 << 20)), StageTimes(),
             batch_size=8, read_concurrency=2, max_bytes=1 << 20)
    hf, processor = AutoModelForImageClassification.from_pretrained(output), AutoImageProcessor.from_pretrained(output)
    images = [Image.open(digits / item.key).convert("RGB") for item in items]
    with torch.no_grad():
        expected = hf(**processor(images, return_tensors="pt")).logits.argmax(-1).tolist()
    assert [row["label"] for row in head.ordered_rows()] == [hf.config.id2label[i] for i in expected]


def test_a_crashed_run_resumes_from_its_last_committed_checkpoint(digits, ctx, tmp_path):
    spec = make_spec(digits, tmp_path / "out", epochs=1, checkpoint_every_steps=5)

    def crash_at_step_10(progress: dict) -> None:
        if progress.get("step", 0) >= 10:
            raise Crash

    with pytest.raises(Crash):
        finetune(spec, "job-resume", ctx, crash_at_step_10)
    assert not (tmp_path / "out" / "config.json").exists()
    assert (tmp_path / "out" / "checkpoints" / "step-00000005" / "_COMMITTED.json").exists()
    # Like a redelivered task: a fresh call that knows nothing but the spec.
    result = finetune(spec, "job-resume", WorkerContext(Settings()), ignore)
    assert result.outcome.resumed_from_step == 5
    assert (tmp_path / "out" / "config.json").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 5 and metrics["steps"] == 23  # ceil(360 / 16)
    # Weights, optimizer, schedule and data position all came back: bit-identical to a run that never crashed.
    uninterrupted = finetune(spec.model_copy(update={"output": normalize_uri(str(tmp_path / "b"))}), "b", ctx, ignore)
    assert result.model_fingerprint == uninterrupted.model_fingerprint


def test_an_uncommitted_checkpoint_is_ignored_when_resuming(digits, ctx, tmp_path):
    spec = make_spec(digits, tmp_path / "out", epochs=0.5, checkpoint_every_steps=5)
    junk = tmp_path / "out" / "checkpoints" / "step-00000010"
    junk.mkdir(parents=True)
    (junk / "model.safetensors").write_bytes(b"half written")
    assert finetune(spec, "job-partial", ctx, ignore).outcome.resumed_from_step == 0


def test_checkpoints_of_another_spec_are_not_resumed(digits, ctx, tmp_path):
    finetune(make_spec(digits, tmp_path / "out", epochs=0.3, checkpoint_every_steps=5), "a", ctx, ignore)
    with pytest.raises(SpecError, match="different finetune spec"):
        finetune(make_spec(digits, tmp_path / "out", epochs=0.3, checkpoint_every_steps=5, lr=1e-4), "b", ctx, ignore)


def test_a_nan_loss_stops_training_and_saves_no_model(digits, ctx, tmp_path):
    exploding = {**TINY_VIT, "initializer_range": 1e30}  # weights overflow fp32 at once
    spec = make_spec(digits, tmp_path / "out", config=exploding, epochs=0.3)
    with pytest.raises(TrainingDiverged, match="diverged|NaN"):
        finetune(spec, "job-nan", ctx, ignore)
    assert not (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fp16_training_on_a_cpu_worker_is_a_spec_error(digits, ctx, tmp_path):
    spec = make_spec(digits, tmp_path / "out", precision="fp16", device="cpu")
    with pytest.raises(SpecError, match="fp16 training needs a CUDA device"):
        finetune(spec, "job-fp16", ctx, ignore)


def test_a_config_field_vitconfig_does_not_know_is_a_spec_error(digits, ctx, tmp_path):
    spec = make_spec(digits, tmp_path / "out", config={**TINY_VIT, "hiden_size": 32})
    with pytest.raises(SpecError, match="ViTConfig has no field hiden_size"):
        finetune(spec, "job-typo", ctx, ignore)


def test_a_timm_vit_trains_and_saves_what_workers_load_again(digits, ctx, tmp_path):
    spec = make_spec(digits, tmp_path / "out", config=TINY_TIMM, epochs=1, augment="randaugment")
    result = finetune(spec, "job-timm", ctx, ignore)
    loaded = load_model(normalize_model_ref(str(tmp_path / "out")), device="cpu")
    assert loaded.family.model_kind is ModelKind.TIMM and loaded.id2label == dict(enumerate(DIGITS))
    assert loaded.input_size == (32, 32) and loaded.fingerprint == result.model_fingerprint


def test_freeze_backbone_trains_only_the_classifier_of_a_pretrained_model(trained, digits, ctx, tmp_path):
    from safetensors.torch import load_file

    start = trained[2]
    spec = make_spec(digits, tmp_path / "out", config=None, model=str(start), freeze_backbone=True, epochs=0.3,
                     augment="basic")
    finetune(spec, "job-freeze", ctx, ignore)
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == ["classifier.bias", "classifier.weight"]


def test_evaluate_metrics_agree_with_its_own_predictions(trained, digits, ctx, tmp_path):
    from sklearn.metrics import precision_recall_fscore_support

    spec = EvaluateSpec(input=str(digits), output=str(tmp_path / "eval"), model=str(trained[2]), device="cpu")
    result = evaluate(spec, "job-eval", ctx, ignore)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert result.rows == metrics["n_images"] == len(rows) == 401
    assert result.errors == metrics["n_errors"] == 1
    good = [r for r in rows if r["error"] is None]
    assert [r["key"] for r in rows if r["error"]] == [BROKEN]
    assert result.outcome == Evaluated(metrics["accuracy"])
    assert metrics["accuracy"] == pytest.approx(np.mean([r["correct"] for r in good]))
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    truth, predicted = [r["label"] for r in good], [r["predicted"] for r in good]
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=DIGITS,
                                                                     zero_division=0)
    assert [metrics["per_class"][d]["recall"] for d in DIGITS] == pytest.approx(list(recall))
    assert [metrics["per_class"][d]["precision"] for d in DIGITS] == pytest.approx(list(precision))
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    assert [metrics["per_class"][d]["support"] for d in DIGITS] == list(support)
    assert Image.open(io.BytesIO((tmp_path / "eval" / "confusion_matrix.png").read_bytes())).size[0] > 100


def test_evaluate_refuses_labels_the_model_does_not_know(trained, tmp_path, ctx):
    for label in ("7", "zebra"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / label / "x.png")
    spec = EvaluateSpec(input=str(tmp_path / "data"), output=str(tmp_path / "eval"), model=str(trained[2]))
    with pytest.raises(SpecError, match="not known to the model.*zebra"):
        evaluate(spec, "job-eval", ctx, ignore)


def test_a_config_that_sets_the_labels_is_a_spec_error_saying_to_drop_them(tmp_path):
    from workers.training.finetune import build_model

    spec = FinetuneSpec(train=str(tmp_path), output=str(tmp_path / "out"), config={**TINY_VIT, "num_labels": 3})
    with pytest.raises(SpecError, match="--config may not set num_labels: the labels come from the data; drop it"):
        build_model(spec, ["a", "b"], ctx=None)


DIGIT_PREP = Preprocess(size=(32, 32), resample=2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _epoch(dataset) -> list[torch.Tensor]:
    return [dataset[i]["pixel_values"] for i in range(len(dataset))]


def test_without_augmentation_an_image_is_read_and_decoded_once_across_epochs(digits, ctx, tmp_path):
    """Epoch two of `--augment none` reads nothing: its files can be gone and the pixels are the same."""
    paths = sorted(digits.rglob("*.png"))[:12]
    for path in paths:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    items = [LabeledItem(key=p.name, uri=normalize_uri(str(tmp_path / p.name)), label="x") for p in paths]
    train, _ = transforms(DIGIT_PREP, "none")
    dataset = LabeledImages(items, {"x": 0}, ctx, train)
    first = _epoch(dataset)
    for path in paths:
        (tmp_path / path.name).unlink()
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(dataset)))


def test_random_augmentation_decodes_anew_each_epoch_and_a_full_cache_reads_again(digits, ctx, tmp_path):
    path = sorted(digits.rglob("*.png"))[0]
    (tmp_path / path.name).write_bytes(path.read_bytes())
    items = [LabeledItem(key=path.name, uri=normalize_uri(str(tmp_path / path.name)), label="x")]
    augmented, evaluate = transforms(DIGIT_PREP, "basic")
    for dataset in (LabeledImages(items, {"x": 0}, ctx, augmented), LabeledImages(items, {"x": 0}, ctx, evaluate,
                                                                                   cache_bytes=0)):
        _epoch(dataset)
        (tmp_path / path.name).rename(tmp_path / "away.png")
        with pytest.raises(ObjectNotFound):
            _epoch(dataset)
        (tmp_path / "away.png").rename(tmp_path / path.name)
