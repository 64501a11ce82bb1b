"""Fine-tuning: labeled images in, a save_pretrained classifier at the output prefix out.

Both families train through transformers' Trainer. A timm model is wrapped in
`TimmForTraining` (forward(pixel_values, labels) -> {"loss", "logits"}), so HF and
timm share one path for mixed precision, the LR schedule, checkpoints and resume
(optimizer, scheduler, RNG and the data position). A hand-written loop would have
to re-implement each of those; Trainer needed one fix instead (HF weights were not
really restored on resume: see checkpoints.ResumableTrainer).

Checkpoints and resume live in workers/checkpoints.py, the Dataset and transforms
in workers/datasets.py, the train/val split in workers/splits.py, and what the run
reports from Trainer's log (progress, divergence, metrics.json) in workers/trainlog.py.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from orchestrator.errors import SpecError
from orchestrator.jobs import FinetuneSpec
from orchestrator.modelrefs import normalize_model_ref
from orchestrator.storage import ObjectStore, join
from workers import models
from workers.checkpoints import ResumableTrainer, UploadCheckpoints, all_finite, restore
from workers.context import WorkerContext
from workers.datasets import LabeledImages, screen, transforms
from workers.errors import ModelLoadError, TrainingDiverged
from workers.modelfiles import check_model_dir, local_model_dir
from workers.preprocess import Preprocess
from workers.splits import train_val
from workers.trainlog import ReportProgress, StopOnDivergence, write_metrics


class TimmForTraining(torch.nn.Module):
    """A timm classifier behind the interface Trainer calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits.float(), labels)
        return out


@dataclass
class Built:
    family: str
    model: torch.nn.Module  # what Trainer trains (timm models wrapped)
    prep: Preprocess  # the inference preprocessing the saved model will get
    processor: object | None = None  # HF image processor, saved next to the weights


def build_model(spec: FinetuneSpec, names: list[str], ctx: WorkerContext) -> Built:
    # num_labels follows from id2label; passing both warns when a checkpoint had other labels.
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if spec.config is None:
        return _from_pretrained(spec.model, labels, ctx)
    try:
        return _from_config(dict(spec.config), labels)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # unknown arch, bad sizes...
        raise SpecError(f"--config does not build a model: {type(e).__name__}: {e}") from e


def _from_config(config: dict, labels: dict) -> Built:
    if "architecture" in config:
        import timm

        return _timm(timm.create_model(config.pop("architecture"), pretrained=False,
                                       num_classes=len(labels["id2label"]), **config))
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    label_keys = sorted({"num_labels", "id2label", "label2id"} & set(config))
    if label_keys:
        raise SpecError(f"--config may not set {', '.join(label_keys)}: the labels come from the data; drop it")
    # ViTConfig keeps unknown keys as attributes: a typo (hiden_size) would silently train the default.
    unknown = sorted(set(config) - set(inspect.signature(ViTConfig).parameters))
    if unknown:
        raise SpecError(f"--config: ViTConfig has no field {', '.join(unknown)}: check the spelling against "
                        "transformers' ViTConfig")
    module = ViTForImageClassification(ViTConfig(**config, **labels))
    size = module.config.image_size
    return _hf(module, ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3))


def _from_pretrained(ref: str, labels: dict, ctx: WorkerContext) -> Built:
    path = local_model_dir(ref, ctx.store, ctx.settings)
    if path is not None:  # the same rules as inference: no remote code, safetensors only
        check_model_dir(path)
    name = str(path) if path is not None else ref.split(":", 1)[1]
    try:
        if models.model_family(ref, path) == "timm":
            import timm

            source = f"local-dir:{name}" if path is not None else name
            return _timm(timm.create_model(source, pretrained=True, num_classes=len(labels["id2label"])))
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        module = AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, use_safetensors=True,
                                                                 trust_remote_code=False, **labels)
        return _hf(module, AutoImageProcessor.from_pretrained(name, trust_remote_code=False))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model {ref!r} cannot be loaded ({e}): pass a local directory or s3:// URI") from e


def _hf(module, processor) -> Built:
    return Built("hf", module, models.hf_preprocess(processor), processor)


def _timm(module) -> Built:
    return Built("timm", TimmForTraining(module), models.timm_preprocess(module))


def freeze_backbone(built: Built) -> None:
    head = built.model.classifier if built.family == "hf" else built.model.model.get_classifier()
    built.model.requires_grad_(False)
    head.requires_grad_(True)


def _precision(precision: str, device: torch.device) -> dict:
    if precision == "auto":
        # Measured on a 2-core AVX2 EPYC (no AVX512-BF16, no AMX): bf16 autocast trained the
        # demo ViT about 10x slower than fp32, so CPUs get bf16 only where AMX runs it natively.
        fast_bf16 = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                     else torch.cpu._is_amx_tile_supported())
        precision = "bf16" if fast_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SpecError("fp16 training needs a CUDA device: use --precision bf16 or fp32 on CPU workers")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _arguments(spec: FinetuneSpec, out_dir: Path, device: torch.device, has_val: bool) -> TrainingArguments:
    # Every save step is also a log step, so a NaN loss is caught before it is checkpointed.
    # warmup_steps below 1 is a share of the steps (transformers 5 dropped warmup_ratio).
    logging_steps = math.gcd(spec.checkpoint_every_steps, 10)
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size, num_train_epochs=spec.epochs, learning_rate=spec.lr,
        weight_decay=spec.weight_decay, warmup_steps=spec.warmup_ratio, lr_scheduler_type="linear",
        seed=spec.seed, **_precision(spec.precision, device), save_strategy="steps",
        save_steps=spec.checkpoint_every_steps, save_total_limit=2, logging_steps=logging_steps,
        logging_nan_inf_filter=False, eval_strategy="epoch" if has_val else "no", report_to=[],
        dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu",
        disable_tqdm=True, remove_unused_columns=False,
    )


def _accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def save_model(built: Built, names: list[str], dest: Path) -> Path:
    built.model.to("cpu")
    if not all_finite(built.model):
        raise TrainingDiverged("the trained weights hold NaN or inf; lower --lr")
    if built.family == "hf":
        built.model.save_pretrained(dest)
        built.processor.save_pretrained(dest)
    else:
        import timm

        timm.models.save_for_hf(built.model.model, dest, model_config={"label_names": names},
                                safe_serialization=True)
    return dest


def upload_dir(store: ObjectStore, local: Path, output: str) -> None:
    """config.json goes last: loaders look for it, so they never see half a model."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", str(p)))
    for path in files:
        store.write(join(output, path.relative_to(local).as_posix()), path.read_bytes())


def _trainer(spec: FinetuneSpec, built: Built, names: list[str], data: tuple[list, list], ctx: WorkerContext,
             out_dir: Path, callbacks: list) -> ResumableTrainer:
    train_items, val_items = data
    train_tf, eval_tf = transforms(built.prep, spec.augment)
    label_ids = {name: i for i, name in enumerate(names)}
    trainer = ResumableTrainer(
        model=built.model, args=_arguments(spec, out_dir, models.resolve_device(spec.device), bool(val_items)),
        train_dataset=LabeledImages(train_items, label_ids, ctx, train_tf),
        eval_dataset=LabeledImages(val_items, label_ids, ctx, eval_tf) if val_items else None,
        compute_metrics=_accuracy, callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to `report`, not stdout
    return trainer


def finetune(spec: FinetuneSpec, job_id: str, ctx: WorkerContext, report: Callable[[dict], None]) -> dict:
    """Train, checkpoint and resume; save the model, metrics.json and training_curve.png at spec.output."""
    start = time.perf_counter()
    train_items, val_items, names = train_val(spec, ctx.store)
    torch.manual_seed(spec.seed)  # the from-scratch initialization is part of the seeded run
    built = build_model(spec, names, ctx)  # before the decode pass: a bad --config fails in seconds
    if spec.freeze_backbone:
        freeze_backbone(built)
    train_items, train_skipped = screen(train_items, ctx)
    val_items, val_skipped = screen(val_items, ctx)
    if not train_items:
        raise SpecError(f"none of the training images in {spec.train} could be decoded")
    progress = ReportProgress(report, len(train_items), round(spec.epochs * len(train_items)))
    with tempfile.TemporaryDirectory(prefix=f"vitbatch-finetune-{job_id}-") as tmp:
        resumed_from, checkpoint = restore(spec, ctx.store, Path(tmp) / "trainer")
        callbacks = [StopOnDivergence(), UploadCheckpoints(ctx.store, spec.output, spec.model_dump(mode="json")),
                     progress]
        trainer = _trainer(spec, built, names, (train_items, val_items), ctx, Path(tmp) / "trainer", callbacks)
        trainer.train(resume_from_checkpoint=checkpoint)
        evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
        if val_items and (not evals or evals[-1]["step"] != trainer.state.global_step):
            trainer.evaluate()  # fractional epochs, or a resume that had nothing left to train
        saved = save_model(built, names, Path(tmp) / "model")
        fingerprint = models.load(normalize_model_ref(str(saved)), device="cpu").fingerprint
        upload_dir(ctx.store, saved, spec.output)
    stats = {"wall_s": round(time.perf_counter() - start, 2), "images_per_s": progress.images_per_s(
        trainer.args, trainer.state), "steps": trainer.state.global_step, "n_train": len(train_items),
        "n_val": len(val_items), "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"}
    metrics = write_metrics(ctx.store, spec.output, trainer.state.log_history,
                            {"labels": names, "skipped": train_skipped + val_skipped,
                             "resumed_from_step": resumed_from, **stats})
    return {"rows": len(train_items), "errors": len(metrics["skipped"]), "model_fingerprint": fingerprint,
            "stats": stats, "val_accuracy": metrics["val_accuracy"], "resumed_from_step": resumed_from}
