"""Submit-time checks for the jobs that read labeled data (finetune, evaluate)."""

from __future__ import annotations

from collections import Counter

from orchestrator.inputs.labeledsources import LabeledItem, label_options
from orchestrator.inputs.labels import check_val_labels, class_names, load_labeled
from orchestrator.jobspec.modelkinds import checkpoint_kind
from orchestrator.jobspec.modelrefs import read_config
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.store.storage import ObjectStore


def trained_images(n_train: int, epochs: float) -> int:
    """A finetune job's progress unit and total: every training image once per epoch. Submit's
    total and the worker's progress and commit all count in it (the worker corrects the total
    when some images turn out undecodable)."""
    return round(n_train * epochs)


def held_out(class_size: int, val_split: float) -> int:
    """How many images of one class --val-split keeps for validation (workers.training.splits.stratified_split):
    the share, rounded, and at least one of a class of two or more, never all of it."""
    n_val = round(class_size * val_split)
    if val_split > 0 and class_size >= 2:
        n_val = min(max(n_val, 1), class_size - 1)
    return n_val


def check_evaluate(spec: EvaluateSpec, store: ObjectStore) -> dict:
    """An evaluate job's checks that need no GPU; returns the plan summary written to _job.json."""
    _check_model(spec, spec.model, store)
    items = load_labeled(spec.input, store, label_options(spec))
    return {"items": len(items), "classes": class_names(items)}


def check_finetune(spec: FinetuneSpec, store: ObjectStore) -> dict:
    """A finetune job's checks that need no GPU; returns the plan summary written to _job.json."""
    _check_model(spec, spec.model, store)
    train = load_labeled(spec.train, store, label_options(spec))
    names = class_names(train)
    summary = {"train_images": len(train), "classes": names}
    if spec.val is not None:
        val = load_labeled(spec.val, store, label_options(spec))
        check_val_labels(set(names), val)
        summary["val_images"] = len(val)
    summary["items"] = trained_images(_n_train(train, spec), spec.epochs)
    return summary


def _n_train(train: list[LabeledItem], spec: FinetuneSpec) -> int:
    """The images the worker trains on: --train less the --val-split it holds out (when --val is unset)."""
    if spec.val is not None:
        return len(train)
    return len(train) - sum(held_out(n, spec.val_split) for n in Counter(item.label for item in train).values())


def _check_model(spec: FinetuneSpec | EvaluateSpec, model: str | None, store: ObjectStore) -> None:
    """The spec's model, where it names one (a job from scratch has no checkpoint to check): a local or
    s3 model without config.json is refused now, and the kind's needs are its spec's."""
    config = read_config(model, store) if model is not None else None
    if model is not None and config is not None:
        spec.check_checkpoint(checkpoint_kind(model, config), config)  # SpecError for one vitbatch cannot load
