"""What submit can tell from a model directory's config.json before anything is written.

A worker would find the same problems, but only after the job was planned, written and
enqueued, and then once per shard. Nothing here imports torch, transformers or timm:
where transformers is installed, the list of model types its image classifiers cover is
read from its source text; where it is not (a submit-only install), the worker checks.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

from orchestrator.errors import SpecError
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind, checkpoint_kind
from orchestrator.jobspec.modelrefs import is_onnx, label_count, model_depth, read_config


def check_model_options(spec, config: dict | None) -> None:
    """SpecError when the spec asks the model (config.json of a directory; None for hub names) for
    what it does not have: remote code, an unknown architecture, what its kind needs of the checkpoint
    (the spec's own `check_checkpoint`), more labels or layers. A hub name is checked once by the
    worker that loads it (the job fails once)."""
    if config is not None:
        check_checkpoint(spec, config)
        if getattr(spec, "labels", None) is None:
            _check_top_k(spec, config)
        _check_layers(spec, config)


def check_checkpoint(spec, config: dict) -> None:
    """No remote code, an architecture vitbatch loads (an ONNX export's is its source's), and what the
    spec's kind needs of the checkpoint."""
    _check_no_remote_code(spec.model, config)
    if not is_onnx(config):
        _check_architecture(spec.model, config)
    spec.check_checkpoint(checkpoint_kind(spec.model, config), config)


def check_job_fits(spec, checkpoint: Checkpoint) -> None:
    """What the job's kind needs of a loaded checkpoint (the worker's check of a hub name): its spec says."""
    spec.check_checkpoint(checkpoint)


def check_export(spec, store) -> dict:
    """Submit-time checks of an export job: a PyTorch source model, sample images that exist.
    Returns the plan summary (`items`: the images the parity check runs)."""
    from orchestrator.inputs.planner import plan

    config = read_config(spec.model, store)
    if config is not None:
        check_checkpoint(spec, config)
    if spec.input is None:
        return {"items": spec.samples, "sample": "synthetic"}
    images = [item for item in plan(spec.input, 1_000_000, store).items if not item.tar]
    if not images:
        raise SpecError(f"--input {spec.input} holds no image files for the parity check (tars are not sampled)")
    return {"items": min(spec.samples, len(images)), "sample": "input"}


def _check_no_remote_code(ref: str, config: dict) -> None:
    if "auto_map" in config:
        raise SpecError(f"model {ref!r} names its own code (config.json auto_map): vitbatch never runs code shipped "
                        "with a model; use an architecture that transformers or timm provide")


def _check_architecture(ref: str, config: dict) -> None:
    if "architecture" in config:  # timm save_for_hf: the name is checked by timm on the worker
        if not isinstance(config["architecture"], str) or not config["architecture"]:
            raise SpecError(f"model {ref!r}: config.json 'architecture' must name a timm model")
        return
    checkpoint = checkpoint_kind(ref, config)  # SpecError for what vitbatch cannot load
    model_type = checkpoint.model_type
    known = image_model_types()
    if checkpoint.model_kind is ModelKind.CLASSIFIER and known is not None and model_type not in known:
        raise SpecError(f"model {ref!r}: model_type {model_type!r} is not an image classifier transformers "
                        f"knows (it has {', '.join(sorted(known)[:8])}, ...)")


def _check_top_k(spec, config: dict) -> None:
    top_k = getattr(spec, "top_k", None)
    n_labels = label_count(config)
    if top_k is not None and n_labels is not None and top_k > n_labels:
        raise SpecError(f"top_k={top_k} is larger than the model's {n_labels} labels: pass --top-k {n_labels} or less")


def _check_layers(spec, config: dict) -> None:
    layers = getattr(spec, "layers", None)
    depth = model_depth(config)
    if not layers or depth is None:
        return
    missing = [layer for layer in layers if not -depth <= layer < depth]
    if missing:
        raise SpecError(f"--layers {','.join(map(str, missing))}: the model has {depth} layers "
                        f"(0 to {depth - 1}, or -1 to -{depth} counting from the last)")


@cache
def image_model_types() -> frozenset[str] | None:
    """model_type values AutoModelForImageClassification loads, from transformers' source text
    (never imported: it would bring torch into the control plane); None where unknown."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto" / "modeling_auto.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"
                                                 for t in node.targets)
                and isinstance(node.value, ast.Call) and node.value.args):
            try:
                return frozenset(name for name, _ in ast.literal_eval(node.value.args[0]))
            except (ValueError, TypeError):
                return None
    return None
