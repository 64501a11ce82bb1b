"""Fine-tuning: labeled images in, a save_pretrained classifier at the output prefix out.

Both libraries train through transformers' Trainer. A timm model is wrapped in
`TimmForTraining` (forward(pixel_values, labels) -> {"loss", "logits"}), so HF and
timm share one path for mixed precision, the LR schedule, checkpoints and resume
(optimizer, scheduler, RNG and the data position). A hand-written loop would have
to re-implement each of those; Trainer needed one fix instead (HF weights were not
really restored on resume: see checkpoints.ResumableTrainer).

What is trained (a --config, or a checkpoint of any kind with a head sized from the labels) is
built in workers/training/trainable.py; checkpoints and resume live in workers/training/checkpoints.py, the Dataset and transforms
in workers/training/datasets.py, the train/val split in workers/training/splits.py, and what the run
reports from Trainer's log (progress, divergence, metrics.json) in workers/training/trainlog.py.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from orchestrator.constants import MODEL_CONFIG_FILE
from orchestrator.errors import SpecError
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.jobspec.modelspecs import FinetuneSpec
from orchestrator.lifecycle.commits import ShardWork, Trained
from orchestrator.store.storage import ObjectStore, join
from workers import models
from workers.context import WorkerContext
from workers.errors import TrainingDiverged
from workers.training.checkpoints import ResumableTrainer, UploadCheckpoints, all_finite, restore
from workers.training.datasets import LabeledImages, screen, transforms
from workers.training.precision import resolve as training_precision
from workers.training.splits import train_val
from workers.training.trainable import Built, build_model
from workers.training.trainlog import ReportProgress, StopOnDivergence, write_metrics


def _precision(precision: str, device: torch.device, model: torch.nn.Module) -> dict:
    precision = training_precision(precision, device, model)
    if precision == "fp16" and device.type != "cuda":
        raise SpecError("fp16 training needs a CUDA device: use --precision bf16 or fp32 on CPU workers")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _arguments(spec: FinetuneSpec, out_dir: Path, device: torch.device, has_val: bool,
               model: torch.nn.Module) -> TrainingArguments:
    # Every save step is also a log step, so a NaN loss is caught before it is checkpointed.
    # warmup_steps below 1 is a share of the steps (transformers 5 dropped warmup_ratio).
    logging_steps = math.gcd(spec.checkpoint_every_steps, 10)
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size, num_train_epochs=spec.epochs, learning_rate=spec.lr,
        weight_decay=spec.weight_decay, warmup_steps=spec.warmup_ratio, lr_scheduler_type="linear",
        seed=spec.seed, **_precision(spec.precision, device, model), save_strategy="steps",
        save_steps=spec.checkpoint_every_steps, save_total_limit=2, logging_steps=logging_steps,
        logging_nan_inf_filter=False, eval_strategy="epoch" if has_val else "no", report_to=[],
        dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu",
        disable_tqdm=True, remove_unused_columns=False,
    )


def _accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def save_model(built: Built, dest: Path) -> Path:
    built.model.to("cpu")
    if not all_finite(built.model):
        raise TrainingDiverged("the trained weights hold NaN or inf; lower --lr")
    return built.save(dest)


def upload_dir(store: ObjectStore, local: Path, output: str) -> None:
    """config.json goes last: loaders look for it, so they never see half a model."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == MODEL_CONFIG_FILE, str(p)))
    for path in files:
        store.write(join(output, path.relative_to(local).as_posix()), path.read_bytes())


def _trainer(spec: FinetuneSpec, built: Built, names: list[str], data: tuple[list, list], ctx: WorkerContext,
             out_dir: Path, callbacks: list) -> ResumableTrainer:
    train_items, val_items = data
    train_tf, eval_tf = transforms(built.prep, spec.augment)
    label_ids = {name: i for i, name in enumerate(names)}
    device = models.resolve_device(spec.device)
    trainer = ResumableTrainer(
        model=built.model, args=_arguments(spec, out_dir, device, bool(val_items), built.model),
        train_dataset=LabeledImages(train_items, label_ids, ctx, train_tf),
        eval_dataset=LabeledImages(val_items, label_ids, ctx, eval_tf) if val_items else None,
        compute_metrics=_accuracy, callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to `report`, not stdout
    return trainer


def finetune(spec: FinetuneSpec, job_id: str, ctx: WorkerContext, report: Callable[[dict], None]) -> ShardWork:
    """Train, checkpoint and resume; save the model, metrics.json and training_curve.png at spec.output."""
    start = time.perf_counter()
    train_items, val_items, names = train_val(spec, ctx.store)
    torch.manual_seed(spec.seed)  # the from-scratch initialization is part of the seeded run
    built = build_model(spec, names, ctx)  # before the decode pass: a bad --config fails in seconds
    if spec.freeze_backbone:
        built.freeze_backbone()
    train_items, train_skipped = screen(train_items, ctx)
    val_items, val_skipped = screen(val_items, ctx)
    if not train_items:
        raise SpecError(f"none of the training images in {spec.train} could be decoded")
    progress = ReportProgress(report, len(train_items), spec.epochs)
    with tempfile.TemporaryDirectory(prefix=f"vitbatch-finetune-{job_id}-") as tmp:
        resumed_from, checkpoint = restore(spec, ctx.store, Path(tmp) / "trainer")
        callbacks = [StopOnDivergence(), UploadCheckpoints(ctx.store, spec.output, spec.model_dump(mode="json")),
                     progress]
        trainer = _trainer(spec, built, names, (train_items, val_items), ctx, Path(tmp) / "trainer", callbacks)
        trainer.train(resume_from_checkpoint=checkpoint)
        evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
        if val_items and (not evals or evals[-1]["step"] != trainer.state.global_step):
            trainer.evaluate()  # fractional epochs, or a resume that had nothing left to train
        saved = save_model(built, Path(tmp) / "model")
        fingerprint = models.load(normalize_model_ref(str(saved)), device="cpu", settings=ctx.settings,
                                  store=ctx.store).fingerprint
        upload_dir(ctx.store, saved, spec.output)
    stats = {"wall_s": round(time.perf_counter() - start, 2), "images_per_s": progress.images_per_s(
        trainer.args, trainer.state), "steps": trainer.state.global_step, "n_train": len(train_items),
        "n_val": len(val_items), "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "threads": torch.get_num_threads()}
    metrics = write_metrics(ctx.store, spec.output, trainer.state.log_history,
                            {"labels": names, "skipped": train_skipped + val_skipped,
                             "resumed_from_step": resumed_from, **stats})
    # rows: the job's done count, in the unit of its progress total (trained images, see ReportProgress).
    return ShardWork(rows=progress.total, errors=len(metrics["skipped"]), model_fingerprint=fingerprint, stats=stats,
                     outcome=Trained(val_accuracy=metrics["val_accuracy"], resumed_from_step=resumed_from))
