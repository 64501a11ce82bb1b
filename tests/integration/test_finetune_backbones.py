"""Fine-tuning from the checkpoints people start from (ViT, DINOv2 and MAE backbones, CLIP and SigLIP
as linear probes), what the job's progress counts, and a fine-tune's job folder as the next job's model.

The starting checkpoints are the hub's classes in miniature (tests/helpers_checkpoints.py),
loaded by the real loading code; everything trains in fp32 on the CPU, on real digits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobspec.checks.training import check_evaluate, check_finetune, held_out
from orchestrator.jobspec.imagespecs import ClassifySpec
from orchestrator.jobspec.modelkinds import ModelKind
from orchestrator.jobspec.modelrefs import model_folder, normalize_model_ref, read_config
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.lifecycle.commits import JobRecord, ShardWork
from orchestrator.published.outputs import job_dir
from orchestrator.published.publication import publish
from orchestrator.published.results import read_table
from orchestrator.stack.demo import write_digits
from orchestrator.store.storage import ObjectStore, join
from workers.context import WorkerContext
from workers.inprocess import run_local
from workers.modelfiles import local_model_dir
from workers.training.evaluation import evaluate
from workers.training.finetune import build_model, finetune
from workers.training.splits import stratified_split

DIGITS = [str(d) for d in range(10)]
EPOCHS = 3
JOB = "20261201-020000-abcdef"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread than with OpenMP threads spinning for a shared core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> WorkerContext:
    return WorkerContext(Settings(model_cache_dir=str(tmp_path_factory.mktemp("model-cache"))))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, limit=200)
    return root


@pytest.fixture(scope="module")
def few_digits(digits, tmp_path_factory) -> Path:
    """Twelve unlabeled digit images for a classify job."""
    root = tmp_path_factory.mktemp("few")
    for i, path in enumerate(sorted(digits.rglob("*.png"))[::17][:12]):
        shutil.copy(path, root / f"{i:02d}.png")
    return root


def spec_for(train: Path, output: Path | str, start: Path, **overrides) -> FinetuneSpec:
    options = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "augment": "none", "precision": "fp32", "device": "cpu",
               "checkpoint_every_steps": 1000, **overrides}
    return FinetuneSpec(train=str(train), output=str(output), model=str(start), **options)


def finetune_job(spec: FinetuneSpec, ctx: WorkerContext, reports: list | None = None) -> tuple[ShardWork, str]:
    """As the finetune task and finalize do: train into the job's folder, then publish its record."""
    folder = job_dir(spec.output, JOB)
    result = finetune(spec.model_copy(update={"output": folder}), JOB, ctx,
                      reports.append if reports is not None else lambda _: None)
    record = JobRecord.from_json({"job_id": JOB, "kind": "finetune", "job_dir": f"_jobs/{JOB}", "model": f"_jobs/{JOB}"})
    publish(ctx.store, spec.output, record, True, {})  # the record's copy lands in the job folder too
    return result, folder


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def classify_labels(model_ref: str, images: Path, output: Path, ctx: WorkerContext) -> list[str]:
    """Labels a vitbatch classify job writes for the images, in key order."""
    spec = ClassifySpec(input=str(images), output=str(output), model=model_ref, precision="fp32", device="cpu",
                        top_k=1, batch_size=8)
    run_local(spec, ctx)
    rows = sorted(read_table(spec.output, ctx.store).to_pylist(), key=lambda row: row["key"])
    return [row["label"] for row in rows]


def transformers_labels(folder: Path, images: Path) -> list[str]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model, processor = AutoModelForImageClassification.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    pictures = [Image.open(path).convert("RGB") for path in sorted(images.glob("*.png"))]
    with torch.no_grad():
        ids = model(**processor(pictures, return_tensors="pt")).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in ids]


@pytest.fixture(scope="module")
def tuned(digits, checkpoint_dirs, ctx, tmp_path_factory) -> tuple[FinetuneSpec, dict, list[dict], Path]:
    """A ViTModel backbone (google/vit-base-patch16-224-in21k's class) fine-tuned on the digits."""
    spec = spec_for(digits, tmp_path_factory.mktemp("tuned"), checkpoint_dirs("vit-model"), epochs=EPOCHS)
    reports: list[dict] = []
    result, folder = finetune_job(spec, ctx, reports)
    return spec, result, reports, local_path(folder)


# -- starting points ---------------------------------------------------------------------------------
def _reference(name: str, path: Path) -> torch.nn.Module:
    """The starting checkpoint's image side, loaded by its own class."""
    import transformers

    cls = transformers.CLIPVisionModelWithProjection if name == "clip-vision-projection" else transformers.AutoModel
    module = cls.from_pretrained(path)
    return getattr(module, "vision_model", module)


@pytest.mark.parametrize("name", ["vit-model", "dinov2-model", "clip-model", "siglip-model", "clip-vision-projection"])
def test_a_new_head_sits_on_the_checkpoints_own_backbone_weights(name, checkpoint_dirs, ctx, tmp_path):
    start = checkpoint_dirs(name)
    built = build_model(spec_for(tmp_path, tmp_path / "out", start), DIGITS, ctx)
    backbone = getattr(built.model, "vision_model", None) or built.model.base_model
    expected, got = _reference(name, start).state_dict(), backbone.state_dict()
    assert set(got) <= set(expected) and len(got) >= len(expected) - 2  # ViTModel's pooler has no classifier use
    assert [key for key in got if not torch.equal(got[key], expected[key])] == []
    assert built.classifier.out_features == 10 and built.model.config.id2label == dict(enumerate(DIGITS))


def test_mae_fine_tunes_as_a_vit_that_computes_the_mae_encoders_tokens(checkpoint_dirs, ctx, tmp_path):
    start = checkpoint_dirs("vit-mae-model")
    built = build_model(spec_for(tmp_path, tmp_path / "out", start), DIGITS, ctx)
    assert type(built.model).__name__ == "ViTForImageClassification"
    mae = load_model(normalize_model_ref(str(start)), device="cpu", precision="fp32")  # every patch, in order
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = mae.family.embed(pixels).tokens
        got = built.model.eval().vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected)


# -- fine-tune from a backbone -----------------------------------------------------------------------
def test_a_vit_backbone_fine_tuned_on_digits_reloads_with_transformers_and_classifies(tuned, checkpoint_dirs,
                                                                                       few_digits, ctx, tmp_path):
    from transformers import AutoModelForImageClassification

    _, result, _, folder = tuned
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.id2label == dict(enumerate(DIGITS))
    start, trained = _reference("vit-model", checkpoint_dirs("vit-model")).state_dict(), model.vit.state_dict()
    changed = [key for key in trained if not torch.equal(trained[key], start[key])]
    assert len(changed) > len(trained) // 2  # the backbone trained too, not only the head
    loaded = load_model(normalize_model_ref(str(folder)), device="cpu", precision="fp32")
    assert loaded.family.model_kind is ModelKind.CLASSIFIER and loaded.fingerprint == result.model_fingerprint
    labels = classify_labels(str(folder), few_digits, tmp_path / "classified", ctx)
    assert labels == transformers_labels(folder, few_digits)


@pytest.mark.parametrize("name", ["clip-model", "siglip-model", "dinov2-model"])
def test_freeze_backbone_trains_only_the_new_head_and_the_probe_classifies(name, checkpoint_dirs, digits, few_digits,
                                                                            ctx, tmp_path):
    from transformers import AutoModelForImageClassification

    start = checkpoint_dirs(name)
    _, folder = finetune_job(spec_for(digits, tmp_path / "out", start, freeze_backbone=True, val_split=0.0), ctx)
    model = AutoModelForImageClassification.from_pretrained(local_path(folder))
    backbone = getattr(model, "vision_model", None) or model.base_model
    expected, got = _reference(name, start).state_dict(), backbone.state_dict()
    assert [key for key in got if not torch.equal(got[key], expected[key])] == []
    labels = classify_labels(str(tmp_path / "out"), few_digits, tmp_path / "classified", ctx)  # the output prefix
    assert labels == transformers_labels(local_path(folder), few_digits)


# -- progress ------------------------------------------------------------------------------------------
def test_a_finished_finetune_reports_done_equal_to_total_in_trained_images(tuned, ctx):
    spec, result, reports, _ = tuned
    n_train = result.stats["n_train"]
    assert reports[-1]["done"] == reports[-1]["total"] == EPOCHS * n_train
    # The commit's rows become the job's done count; submit's total is the same number.
    assert result.rows == EPOCHS * n_train
    assert check_finetune(spec, ctx.store)["items"] == EPOCHS * n_train


@pytest.mark.parametrize("val_split", [0.0, 0.1, 0.25, 0.5])
def test_submit_holds_out_what_the_workers_split_holds_out(digits, checkpoint_dirs, val_split, ctx):
    from orchestrator.inputs.labels import load_labeled

    spec = spec_for(digits, "/unused", checkpoint_dirs("vit-model"), val_split=val_split, epochs=2.5)
    train, _ = stratified_split(load_labeled(spec.train, ctx.store), val_split, spec.seed)
    assert check_finetune(spec, ctx.store)["items"] == round(2.5 * len(train))
    assert held_out(1, 0.5) == 0 and held_out(2, 0.01) == 1 and held_out(3, 0.99) == 2


# -- a job folder as --model ------------------------------------------------------------------------
def test_evaluate_takes_a_finetune_job_folder_as_its_model(tuned, digits, ctx, tmp_path):
    spec, result, _, folder = tuned
    for model in (str(folder), spec.output):  # the job folder, and the output prefix
        evaluation = EvaluateSpec(input=str(digits), output=str(tmp_path / "eval"), model=model, device="cpu",
                                  precision="fp32")
        assert check_evaluate(evaluation, ctx.store)["items"] == 200  # submit's checks read its config.json
        assert evaluate(evaluation, "job-eval", ctx, lambda _: None).model_fingerprint == result.model_fingerprint


def test_an_s3_finetune_job_folder_is_its_own_model_folder(tuned, s3, s3_endpoint, tmp_path):
    _, _, _, folder = tuned
    s3.create_bucket(Bucket="vitbatch-job-folders")
    prefix = "s3://vitbatch-job-folders/tuned/"
    store = ObjectStore(Settings(s3_endpoint_url=s3_endpoint))
    for path in folder.rglob("*"):
        if path.is_file():
            store.write(join(prefix, "_jobs", JOB, path.relative_to(folder).as_posix()), path.read_bytes())
    store.write(join(prefix, "_SUCCESS.json"), (folder / "_SUCCESS.json").read_bytes())
    job_folder = join(prefix, "_jobs", JOB) + "/"
    assert model_folder(job_folder, store) == job_folder
    assert model_folder(prefix, store) == join(prefix, "_jobs", JOB)
    settings = Settings(s3_endpoint_url=s3_endpoint, model_cache_dir=str(tmp_path / "cache"))
    for ref in (job_folder, prefix):
        assert read_config(ref, store)["architectures"] == ["ViTForImageClassification"]
        assert (local_model_dir(ref, store, settings) / "model.safetensors").is_file()


# -- evaluate needs a trained classifier ------------------------------------------------------------
def test_the_evaluate_worker_refuses_a_backbone_with_the_reason(checkpoint_dirs, digits, ctx, tmp_path):
    spec = EvaluateSpec(input=str(digits), output=str(tmp_path / "eval"), model=str(checkpoint_dirs("vit-model")),
                        device="cpu", precision="fp32")
    with pytest.raises(SpecError, match="ViTModel backbone without a trained classifier.*finetune"):
        evaluate(spec, "job-backbone", ctx, lambda _: None)
    assert not (tmp_path / "eval").exists()

