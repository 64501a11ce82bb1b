"""Evaluate a classifier on labeled images: accuracy, top-k, per-class report, confusion matrix.

Images go through the same shard path as classify jobs (workers.runner.run_with), so the accuracy here is
the accuracy of what classify would output. Metrics are plain numpy (sklearn is
only a test dependency).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from orchestrator.errors import SpecError
from orchestrator.inputs.labeledsources import label_options
from orchestrator.inputs.labels import load_labeled
from orchestrator.inputs.manifest import Item
from orchestrator.jobspec.checks.models import check_job_fits
from orchestrator.jobspec.modelkinds import Checkpoint
from orchestrator.jobspec.modelspecs import EvaluateSpec
from orchestrator.lifecycle.commits import Evaluated, ShardWork
from orchestrator.store.storage import join
from workers.context import WorkerContext
from workers.decode.labeledcells import ContainerReader
from workers.decode.preprocess import Decoder
from workers.heads import top_k
from workers.loaded import LoadedModel
from workers.pipeline import DecodePath
from workers.runner import run_with
from workers.stagetimes import StageTimes
from workers.writers import parquet_bytes

READ_CONCURRENCY = 16  # EvaluateSpec has no knob for it; the classify default
PREDICTIONS_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.string()), ("predicted", pa.string()), ("score", pa.float32()),
    ("correct", pa.bool_()), ("error", pa.string()),
])


class EvalHead:
    """Keeps the top-k classes and scores per image (not whole logits: memory stays flat
    with thousands of classes) and the model's time per batch."""

    def __init__(self, model: LoadedModel, top_k: int) -> None:
        self.model, self.top_k = model, top_k
        self.topk: dict[int, tuple[list[int], list[float]]] = {}
        self.errors: dict[int, str] = {}
        self.batch_s: list[float] = []

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        output = top_k(self.model, pixels, self.top_k)  # on the CPU when it returns: the timing is real
        self.batch_s.append(time.perf_counter() - t0)
        return output

    def collect(self, indices: list[int], items: list[Item], output, images=None) -> None:
        scores, ids = output
        for index, row_scores, row_ids in zip(indices, scores.tolist(), ids.tolist()):
            self.topk[index] = (row_ids, row_scores)

    def wants_image(self, index: int) -> bool:
        return False

    def error(self, index: int, item: Item, reason: str) -> None:
        self.errors[index] = reason


def loaded_checkpoint(model: LoadedModel) -> Checkpoint:
    """What submit's checks know of a checkpoint, as its loaded model says it: its kind, the class it was
    saved as, and whether it has a trained classifier (a classifier checkpoint may lack the head's weights)."""
    module = model.family.module
    architectures = getattr(getattr(module, "config", None), "architectures", None) or []
    architecture = architectures[0] if architectures else getattr(module, "pretrained_cfg", {}).get(
        "architecture", type(module).__name__)
    return Checkpoint(model.family.model_kind, architecture, classifier=model.family.has_classifier)


def label_ids(model: LoadedModel, labels: set[str]) -> dict[str, int]:
    """Data label name -> the model's class id; SpecError naming labels the model does not have."""
    by_name = {name: i for i, name in model.id2label.items()}
    unknown = sorted(labels - set(by_name))
    if unknown:
        known = ", ".join(list(by_name)[:20]) + (", ..." if len(by_name) > 20 else "")
        raise SpecError(f"labels not known to the model {model.ref}: {', '.join(unknown)} (it knows {known})")
    return {name: by_name[name] for name in labels}


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, names: dict[int, str]) -> dict:
    """Per-class precision/recall/F1/support over classes seen in truth or predictions, and macro means."""
    classes = np.union1d(y_true, y_pred)
    per_class = {}
    for c in classes:
        tp = int(np.sum((y_true == c) & (y_pred == c)))
        predicted, support = int(np.sum(y_pred == c)), int(np.sum(y_true == c))
        precision = tp / predicted if predicted else 0.0  # sklearn's zero_division=0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[names[int(c)]] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    macro = {m: float(np.mean([v[m] for v in per_class.values()])) if per_class else None
             for m in ("precision", "recall", "f1")}
    return {"per_class": per_class, "macro": macro}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Rows: true class, columns: predicted, in the order of `classes`."""
    position = {int(c): i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, ([position[int(t)] for t in y_true], [position[int(p)] for p in y_pred]), 1)
    return matrix


def confusion_png(matrix: np.ndarray, labels: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    from matplotlib.figure import Figure

    side = min(4 + 0.35 * len(labels), 30)
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="confusion matrix")
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticklabels(labels)
    if len(labels) <= 30:  # beyond that the counts are unreadable anyway
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _rows(items, head: EvalHead, names: dict[int, str]) -> list[dict]:
    rows = []
    for index, item in enumerate(items):
        if index in head.errors:
            rows.append({"key": item.key, "label": item.label, "predicted": None, "score": None,
                         "correct": None, "error": head.errors[index]})
        else:
            ids, scores = head.topk[index]
            rows.append({"key": item.key, "label": item.label, "predicted": names[ids[0]], "score": scores[0],
                         "correct": names[ids[0]] == item.label, "error": None})
    return rows


def _metrics(items, head: EvalHead, ids: dict[str, int], names: dict[int, str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """metrics.json's numbers (error rows excluded), and the true and predicted class ids behind them."""
    ok = sorted(head.topk)
    y_true = np.array([ids[items[i].label] for i in ok], dtype=np.int64)
    y_pred = np.array([head.topk[i][0][0] for i in ok], dtype=np.int64)
    in_topk = np.array([ids[items[i].label] in head.topk[i][0] for i in ok], dtype=bool)
    latency_ms = np.array(head.batch_s) * 1000
    report = classification_report(y_true, y_pred, names)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if ok else None,
        # Named top5 whatever k is: with fewer than 5 classes, k is the class count ("top_k").
        "top5_accuracy": float(np.mean(in_topk)) if ok else None, "top_k": head.top_k,
        "per_class": report["per_class"], "macro_precision": report["macro"]["precision"],
        "macro_recall": report["macro"]["recall"], "macro_f1": report["macro"]["f1"],
        "n_images": len(items), "n_errors": len(head.errors),
        "batch_latency_ms": {"p50": float(np.percentile(latency_ms, 50)) if len(latency_ms) else None,
                             "p95": float(np.percentile(latency_ms, 95)) if len(latency_ms) else None},
    }, y_true, y_pred


def evaluate(spec: EvaluateSpec, job_id: str, ctx: WorkerContext, report: Callable[[dict], None]) -> ShardWork:
    """Write metrics.json, confusion_matrix.png and predictions.parquet under spec.output."""
    items = load_labeled(spec.input, ctx.store, label_options(spec))
    model = ctx.models.get(spec.model, spec.device, spec.precision)
    check_job_fits(spec, loaded_checkpoint(model))  # submit checks directories; hub names are seen here first
    ids = label_ids(model, {item.label for item in items})
    head = EvalHead(model, top_k=min(5, len(model.id2label)))
    path = DecodePath(Decoder(model.prep, ctx.settings.max_pixels))  # decoded in threads
    times = StageTimes()  # the job's timer: its stats in the commit marker
    run_with(model, ctx.store, [Item(key=i.key, uri=i.uri) for i in items], head, path, times,
             batch_size=spec.batch_size, read_concurrency=READ_CONCURRENCY,
             max_bytes=ctx.settings.max_object_bytes, blobs=ContainerReader(ctx.store, ctx.settings),
             on_progress=lambda done, total: report({"done": done, "total": total}))
    metrics, y_true, y_pred = _metrics(items, head, ids, model.id2label)
    metrics["images_per_s"] = round(len(items) / times.wall_s, 2) if times.wall_s else 0.0
    metrics["threads"] = torch.get_num_threads()
    classes = np.union1d(y_true, y_pred)
    matrix = confusion(y_true, y_pred, classes)
    metrics["confusion_labels"] = [model.id2label[int(c)] for c in classes]
    ctx.store.write(join(spec.output, "predictions.parquet"),
                    parquet_bytes(_rows(items, head, model.id2label), PREDICTIONS_SCHEMA))
    ctx.store.write(join(spec.output, "confusion_matrix.png"), confusion_png(matrix, metrics["confusion_labels"]))
    ctx.store.write(join(spec.output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    stats = {**times.to_json(), "batch_latency_ms": metrics["batch_latency_ms"]}
    return ShardWork(rows=len(items), errors=len(head.errors), model_fingerprint=model.fingerprint, stats=stats,
                     outcome=Evaluated(metrics["accuracy"]))
