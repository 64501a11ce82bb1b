"""Fine-tuning: labeled images in, a save_pretrained classifier at the output prefix out.

Both families train through transformers' Trainer. A timm model is wrapped in
`TimmForTraining` (forward(pixel_values, labels) -> {"loss", "logits"}), so HF and
timm share one path for mixed precision, the LR schedule, checkpoints and resume
(optimizer, scheduler, RNG and the data position); a hand-written loop would have
to re-implement each of those, and resume is where such loops go wrong.

Checkpoints: Trainer writes checkpoint-N to a local temp dir; `UploadCheckpoints`
copies it to <output>/checkpoints/step-N/ and then writes _COMMITTED.json, so only
whole checkpoints count. A redelivered task (fresh process, fresh temp dir)
downloads the newest committed one and resumes from it. Old checkpoints stay in
the store: ObjectStore has no delete.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, SpecError
from orchestrator.jobs import FinetuneSpec, normalize_model_ref
from orchestrator.labels import LabeledItem, check_val_labels, class_names, load_labeled, stratified_split
from orchestrator.storage import ObjectStore, join, relative_key
from workers import models
from workers.errors import BadImage, ModelLoadError, TrainingDiverged
from workers.imaging import decode_rgb, resize_uint8
from workers.runner import WorkerContext

_COMMITTED = "_COMMITTED.json"
_STEP_DIR = re.compile(r"step-(\d{8})/" + re.escape(_COMMITTED))


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


class LabeledImages(torch.utils.data.Dataset):
    """Reads and decodes each image when Trainer asks for it; only screened items come here."""

    def __init__(self, items: list[LabeledItem], label_ids: dict[str, int], ctx: WorkerContext, transform) -> None:
        self.items, self.label_ids, self.ctx, self.transform = items, label_ids, ctx, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"pixel_values": self.transform(_decode(item, self.ctx)), "labels": self.label_ids[item.label]}


def _decode(item: LabeledItem, ctx: WorkerContext):
    data = ctx.store.read(item.uri, max_bytes=ctx.settings.max_object_bytes)
    return decode_rgb(data, max_pixels=ctx.settings.max_pixels)


def screen(items: list[LabeledItem], ctx: WorkerContext) -> tuple[list[LabeledItem], list[dict]]:
    """(decodable items, [{key, reason}] of the rest): one decode pass, so training never meets a bad image."""

    def check(item: LabeledItem) -> str | None:
        try:
            _decode(item, ctx)
        except (BadImage, ObjectNotFound, ObjectTooLarge) as e:
            return getattr(e, "reason", None) or str(e)
        return None

    with ThreadPoolExecutor(8, thread_name_prefix="vitbatch-screen") as pool:
        reasons = list(pool.map(check, items))
    good = [item for item, reason in zip(items, reasons) if reason is None]
    return good, [{"key": item.key, "reason": r} for item, r in zip(items, reasons) if r is not None]


_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def transforms(prep: models.Preprocess, augment: str):
    """(train, eval) PIL -> tensor; eval is exactly the inference pipeline's resize and normalize."""
    from torchvision import transforms as T

    mean, std = torch.tensor(prep.mean).view(3, 1, 1) * 255, torch.tensor(prep.std).view(3, 1, 1) * 255

    def evaluate(img) -> torch.Tensor:
        pixels = resize_uint8(img, size=prep.size, resample=prep.resample, shortest_edge=prep.shortest_edge,
                              crop=prep.crop)
        return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() - mean) / std  # PIL arrays are read-only

    size, interpolation = prep.crop or prep.size, _INTERPOLATION.get(prep.resample, "bilinear")
    if augment == "none":
        return evaluate, evaluate
    if augment == "basic":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=T.InterpolationMode(interpolation)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(prep.mean, prep.std)]), evaluate
    from timm.data import create_transform

    return create_transform((3, *size), is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                            mean=prep.mean, std=prep.std, interpolation=interpolation), evaluate


@dataclass
class Built:
    family: str
    model: torch.nn.Module  # what Trainer trains (timm models wrapped)
    prep: models.Preprocess  # the inference preprocessing the saved model will get
    processor: object | None = None  # HF image processor, saved next to the weights


def build_model(spec: FinetuneSpec, names: list[str], ctx: WorkerContext) -> Built:
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {name: i for i, name in enumerate(names)}}
    if spec.config is not None and "architecture" in spec.config:
        import timm

        rest = {k: v for k, v in spec.config.items() if k != "architecture"}
        return _timm(timm.create_model(spec.config["architecture"], pretrained=False, num_classes=len(names), **rest))
    if spec.config is not None:
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        module = ViTForImageClassification(ViTConfig(**spec.config, **labels))
        size = module.config.image_size
        return _hf(module, ViTImageProcessor(size={"height": size, "width": size},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3))
    path = models.local_model_dir(spec.model, ctx.store, ctx.settings)
    name = str(path) if path is not None else spec.model.split(":", 1)[1]
    try:
        if models.model_family(spec.model, path) == "timm":
            import timm

            source = f"local-dir:{name}" if path is not None else name
            return _timm(timm.create_model(source, pretrained=True, num_classes=len(names)))
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        module = AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **labels)
        return _hf(module, AutoImageProcessor.from_pretrained(name))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"model {spec.model!r} cannot be loaded ({e}): pass a local directory or s3:// URI") from e


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
        # Measured here (2-core AVX2 EPYC, no AMX): bf16 autocast trains the demo ViT
        # 2-4x slower than fp32, so CPUs get bf16 only where AMX does bf16 matmuls natively.
        fast_bf16 = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                     else torch.cpu._is_amx_tile_supported())
        precision = "bf16" if fast_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SpecError("fp16 training needs a CUDA device: use --precision bf16 or fp32 on CPU workers")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class StopOnDivergence(TrainerCallback):
    """A NaN/inf loss stops the job before anything is saved from it."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or state.global_step >= state.max_steps
        return control  # the final step is logged, so it is checked before the final save

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "train_loss", "eval_loss") + (() if args.fp16 else ("grad_norm",))
        for key in keys:  # fp16's loss scaler skips inf gradients by design
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step} (epoch {state.epoch or 0:.2f}): {key} is "
                    f"{value}; lower --lr (now {args.learning_rate:g}) or train in fp32"
                )


class ReportProgress(TrainerCallback):
    def __init__(self, report: Callable[[dict], None], n_train: int, total: int) -> None:
        self.report, self.n_train, self.total = report, n_train, total
        self.t0, self.step0 = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def images_per_s(self, args, state) -> float:
        images = (state.global_step - self.step0) * args.per_device_train_batch_size
        return round(images / max(time.perf_counter() - self.t0, 1e-9), 2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            done = min(round((state.epoch or 0) * self.n_train), self.total)
            self.report({"step": state.global_step, "epoch": round(state.epoch or 0, 3), "loss": logs["loss"],
                         "images_per_s": self.images_per_s(args, state), "done": done, "total": self.total})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.report({"step": state.global_step, "epoch": round(state.epoch or 0, 3),
                     "val_accuracy": (metrics or {}).get("eval_accuracy")})


class UploadCheckpoints(TrainerCallback):
    """Copies each local checkpoint to the store; its _COMMITTED.json goes last."""

    def __init__(self, store: ObjectStore, output: str, spec_json: dict) -> None:
        self.store, self.output, self.spec_json = store, output, spec_json

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and not _all_finite(model):
            raise TrainingDiverged(f"weights became NaN or inf by step {state.global_step}; lower --lr")
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        prefix = join(self.output, "checkpoints", f"step-{state.global_step:08d}")
        for rel in files:
            self.store.write(join(prefix, rel), (local / rel).read_bytes())
        marker = {"step": state.global_step, "files": files, "spec": self.spec_json, "committed_at": time.time()}
        self.store.write(join(prefix, _COMMITTED), json.dumps(marker, indent=2).encode())


def latest_checkpoint(store: ObjectStore, output: str) -> tuple[int, dict] | None:
    """(step, marker) of the newest committed checkpoint under <output>/checkpoints, or None."""
    prefix = join(output, "checkpoints")
    try:
        keys = [relative_key(prefix, info.uri) for info in store.list(prefix)]
    except ObjectNotFound:
        return None
    steps = [int(m[1]) for m in map(_STEP_DIR.fullmatch, keys) if m]
    if not steps:
        return None
    step = max(steps)
    return step, json.loads(store.read(join(prefix, f"step-{step:08d}", _COMMITTED)))


def download_checkpoint(store: ObjectStore, output: str, step: int, marker: dict, dest: Path) -> Path:
    prefix = join(output, "checkpoints", f"step-{step:08d}")
    for rel in marker["files"]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(join(prefix, rel)))
    return dest


def _split(spec: FinetuneSpec, store: ObjectStore):
    items = load_labeled(spec.train, store)
    if spec.val is not None:
        train, val = items, load_labeled(spec.val, store)
    else:
        train, val = stratified_split(items, spec.val_split, spec.seed)
    names = class_names(train)
    check_val_labels(set(names), val)
    return train, val, names


def _arguments(spec: FinetuneSpec, out_dir: Path, device: torch.device, has_val: bool) -> TrainingArguments:
    # Every save step is also a log step, so a NaN loss is caught before it is checkpointed.
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


def _resume(spec: FinetuneSpec, store: ObjectStore, out_dir: Path) -> tuple[int, str | None]:
    found = latest_checkpoint(store, spec.output)
    if found is None:
        return 0, None
    step, marker = found
    if marker.get("spec") != spec.model_dump(mode="json"):
        raise SpecError(f"{spec.output} holds checkpoints of a different finetune spec: use a new --output")
    return step, str(download_checkpoint(store, spec.output, step, marker, out_dir / f"checkpoint-{step}"))


def save_model(built: Built, names: list[str], dest: Path) -> Path:
    if not _all_finite(built.model):
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


def epoch_metrics(log_history: list[dict]) -> list[dict]:
    """Mean logged train loss and the val accuracy of each epoch, from Trainer's log (which survives resume)."""
    losses, accuracy = defaultdict(list), {}
    for entry in log_history:
        epoch = max(1, math.ceil(entry.get("epoch", 0) - 1e-6))  # a step logged at epoch 1.4 is in epoch 2
        if "loss" in entry:
            losses[epoch].append(entry["loss"])
        if "eval_accuracy" in entry:
            accuracy[epoch] = entry["eval_accuracy"]
    return [{"epoch": e, "train_loss": sum(losses[e]) / len(losses[e]) if losses[e] else None,
             "val_accuracy": accuracy.get(e)} for e in sorted(set(losses) | set(accuracy))]


def curve_png(log_history: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    loss_ax = fig.subplots()
    steps = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["epoch"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    loss_ax.plot(*zip(*steps) if steps else ([], []), color="tab:blue", label="train loss")
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(*zip(*evals) if evals else ([], []), "o-", color="tab:orange", label="val accuracy")
    acc_ax.set(ylabel="val accuracy", ylim=(0, 1))
    fig.legend(loc="upper center", ncols=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def finetune(spec: FinetuneSpec, job_id: str, ctx: WorkerContext, report: Callable[[dict], None]) -> dict:
    """Train, checkpoint and resume; save the model, metrics.json and training_curve.png at spec.output."""
    start = time.perf_counter()
    device = models.resolve_device(spec.device)
    train_items, val_items, names = _split(spec, ctx.store)
    train_items, train_skipped = screen(train_items, ctx)
    val_items, val_skipped = screen(val_items, ctx)
    if not train_items:
        raise SpecError(f"none of the training images in {spec.train} could be decoded")
    torch.manual_seed(spec.seed)  # the from-scratch initialization is part of the seeded run
    built = build_model(spec, names, ctx)
    if spec.freeze_backbone:
        freeze_backbone(built)
    train_tf, eval_tf = transforms(built.prep, spec.augment)
    label_ids = {name: i for i, name in enumerate(names)}
    with tempfile.TemporaryDirectory(prefix=f"vitbatch-finetune-{job_id}-") as tmp:
        out_dir = Path(tmp) / "trainer"
        resumed_from, checkpoint = _resume(spec, ctx.store, out_dir)
        total = round(spec.epochs * len(train_items))
        progress = ReportProgress(report, len(train_items), total)
        trainer = Trainer(
            model=built.model, args=_arguments(spec, out_dir, device, bool(val_items)),
            train_dataset=LabeledImages(train_items, label_ids, ctx, train_tf),
            eval_dataset=LabeledImages(val_items, label_ids, ctx, eval_tf) if val_items else None,
            compute_metrics=_accuracy,
            callbacks=[StopOnDivergence(), UploadCheckpoints(ctx.store, spec.output, spec.model_dump(mode="json")),
                       progress],
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to `report`, not stdout
        trainer.train(resume_from_checkpoint=checkpoint)
        evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
        if val_items and (not evals or evals[-1]["step"] != trainer.state.global_step):
            trainer.evaluate()  # fractional epochs, or a resume that had nothing left to train
        built.model.to("cpu")
        saved = save_model(built, names, Path(tmp) / "model")
        fingerprint = models.load(normalize_model_ref(str(saved)), device="cpu").fingerprint
        upload_dir(ctx.store, saved, spec.output)
    epochs = epoch_metrics(trainer.state.log_history)
    skipped = train_skipped + val_skipped
    val_accuracy = next((e["val_accuracy"] for e in reversed(epochs) if e["val_accuracy"] is not None), None)
    stats = {"wall_s": round(time.perf_counter() - start, 2), "images_per_s": progress.images_per_s(
        trainer.args, trainer.state), "steps": trainer.state.global_step, "n_val": len(val_items),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32", "device": device.type}
    metrics = {"labels": names, "n_train": len(train_items), "epochs": epochs, "val_accuracy": val_accuracy,
               "skipped": skipped, "resumed_from_step": resumed_from, **stats}
    ctx.store.write(join(spec.output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    ctx.store.write(join(spec.output, "training_curve.png"), curve_png(trainer.state.log_history))
    return {"rows": len(train_items), "errors": len(skipped), "model_fingerprint": fingerprint, "stats": stats,
            "val_accuracy": val_accuracy, "resumed_from_step": resumed_from}
