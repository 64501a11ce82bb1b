"""Submit-time checks for the jobs that read labeled data (finetune, evaluate)."""

from __future__ import annotations

from orchestrator.jobs import EvaluateSpec, FinetuneSpec
from orchestrator.checks import check_job_fits
from orchestrator.labels import check_val_labels, class_names, load_labeled
from orchestrator.errors import SpecError
from orchestrator.modelinfo import is_onnx, read_config
from orchestrator.modelkinds import checkpoint_kind
from orchestrator.storage import ObjectStore


def check_labeled(spec: FinetuneSpec | EvaluateSpec, store: ObjectStore) -> dict:
    """Every check that needs no GPU; returns the plan summary written to _job.json."""
    if spec.model is not None:
        config = read_config(spec.model, store)  # a local/s3 model without config.json is refused now
        if isinstance(spec, EvaluateSpec) and config is not None:
            check_job_fits(spec, checkpoint_kind(spec.model, config))  # a trained classifier to evaluate
        if isinstance(spec, FinetuneSpec) and is_onnx(config):
            raise SpecError(f"model {spec.model!r} is an ONNX export: fine-tuning starts from a PyTorch model only; "
                            f"pass the model it was exported from ({config.get('source', {}).get('ref', 'its source')})")
    if isinstance(spec, EvaluateSpec):
        items = load_labeled(spec.input, store)
        return {"items": len(items), "classes": class_names(items)}
    train = load_labeled(spec.train, store)
    names = class_names(train)
    summary = {"train_images": len(train), "classes": names}
    if spec.val is not None:
        val = load_labeled(spec.val, store)
        check_val_labels(set(names), val)
        summary["val_images"] = len(val)
    summary["items"] = int(len(train) * spec.epochs)
    return summary
