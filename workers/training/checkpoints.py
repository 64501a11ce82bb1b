"""Trainer checkpoints kept in the object store, so a redelivered finetune resumes.

Trainer writes checkpoint-N to a local temp dir; `UploadCheckpoints` copies it to
<output>/checkpoints/step-NNNNNNNN/ and then writes _COMMITTED.json, so only whole
checkpoints count. A redelivered task (fresh process, fresh temp dir) downloads the
newest committed one. Older checkpoints stay until the job's folder is removed (when a
later job at the prefix succeeds); they are never downloaded as part of the model.

Resume restores weights, optimizer, schedule, RNG and data position: with augment
"none" the resumed run ends bit-identical to an uninterrupted one (tested). Random
augmentations differ after a resume, because accelerate's loader had already drawn
the next batch when the RNG state was saved.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, Trainer, TrainerCallback

from orchestrator.constants import CHECKPOINT_COMMITTED, CHECKPOINTS_DIR
from orchestrator.errors import ObjectNotFound, SpecError
from orchestrator.jobspec.modelspecs import FinetuneSpec
from orchestrator.store.storage import ObjectStore, join, relative_key
from workers.errors import TrainingDiverged

_STEP_DIR = re.compile(r"step-(\d{8})/" + re.escape(CHECKPOINT_COMMITTED))


def all_finite(module: torch.nn.Module) -> bool:
    """False when any weight is NaN or inf: such weights are never checkpointed or saved."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class ResumableTrainer(Trainer):
    """Trainer whose resume really restores the weights, strictly.

    transformers 5.24 writes HF checkpoints with the legacy key names (ViT:
    encoder.layer.N.attention.attention.query) but resumes with a raw, non-strict
    load_state_dict: every layer silently keeps its fresh init (transformers#43701).
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if isinstance(model, PreTrainedModel):  # from_pretrained applies the key conversion
            state = type(model).from_pretrained(resume_from_checkpoint, dtype=torch.float32).state_dict()
        else:
            state = load_file(str(Path(resume_from_checkpoint) / "model.safetensors"))
        model.load_state_dict(state, strict=True)


class UploadCheckpoints(TrainerCallback):
    """Copies each local checkpoint to the store; its _COMMITTED.json goes last."""

    def __init__(self, store: ObjectStore, output: str, spec_json: dict) -> None:
        self.store, self.output, self.spec_json = store, output, spec_json

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and not all_finite(model):
            raise TrainingDiverged(f"weights became NaN or inf by step {state.global_step}; lower --lr")
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        prefix = join(self.output, CHECKPOINTS_DIR, f"step-{state.global_step:08d}")
        for rel in files:
            self.store.write(join(prefix, rel), (local / rel).read_bytes())
        marker = {"step": state.global_step, "files": files, "spec": self.spec_json, "committed_at": time.time()}
        self.store.write(join(prefix, CHECKPOINT_COMMITTED), json.dumps(marker, indent=2).encode())


def latest_checkpoint(store: ObjectStore, output: str) -> tuple[int, dict] | None:
    """(step, marker) of the newest committed checkpoint under <output>/checkpoints, or None."""
    prefix = join(output, CHECKPOINTS_DIR)
    try:
        keys = [relative_key(prefix, info.uri) for info in store.list(prefix)]
    except ObjectNotFound:
        return None
    steps = [int(m[1]) for m in map(_STEP_DIR.fullmatch, keys) if m]
    if not steps:
        return None
    step = max(steps)
    return step, json.loads(store.read(join(prefix, f"step-{step:08d}", CHECKPOINT_COMMITTED)))


def download_checkpoint(store: ObjectStore, output: str, step: int, marker: dict, dest: Path) -> Path:
    prefix = join(output, CHECKPOINTS_DIR, f"step-{step:08d}")
    for rel in marker["files"]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(join(prefix, rel)))
    return dest


def restore(spec: FinetuneSpec, store: ObjectStore, out_dir: Path) -> tuple[int, str | None]:
    """(step, local checkpoint dir) to resume from, or (0, None) for a fresh start."""
    found = latest_checkpoint(store, spec.output)
    if found is None:
        return 0, None
    step, marker = found
    if marker.get("spec") != spec.model_dump(mode="json"):
        raise SpecError(f"{spec.output} holds checkpoints of a different finetune spec: use a new --output")
    return step, str(download_checkpoint(store, spec.output, step, marker, out_dir / f"checkpoint-{step}"))
