"""What a checkpoint is, from its config.json alone (no torch): the one table that decides how a
model loads and which jobs it can run.

The hub publishes the checkpoints people use under many classes: in21k ViT as `ViTModel`,
DINOv2 as `Dinov2Model`, CLIP as `CLIPModel`, SigLIP as `SiglipModel`, MAE as
`ViTMAEModel`. Loading them all as image classifiers would wrap each backbone in a freshly
initialised, random head, so the model kind is read from `config.architectures` (and `model_type`
where a config names no architecture), or from a timm `architecture` and its `pretrained_cfg`.
The worker's adapters (workers/families.py) and submit's checks both ask `checkpoint_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.errors import SpecError


class ModelKind(str, Enum):
    """How a checkpoint loads; the value reads well in errors and records."""

    CLASSIFIER = "hf image classifier"       # ...ForImageClassification: trained head, id2label
    BACKBONE = "hf vision backbone"          # ViTModel, Dinov2Model, ViTMAEModel...: no head
    DUAL = "hf dual encoder"                 # CLIPModel, SiglipModel: image + text towers
    VISION_TOWER = "hf vision tower"         # CLIPVisionModel(WithProjection), SiglipVisionModel: image side only
    TIMM = "timm"
    ONNX = "onnx"


# model_type -> what a base checkpoint of that type is; types not here are refused with the list.
BACKBONE_TYPES = frozenset({"vit", "deit", "beit", "dinov2", "dinov2_with_registers", "vit_mae", "vit_msn"})
DUAL_ARCHITECTURES = frozenset({"CLIPModel", "SiglipModel"})
TOWER_ARCHITECTURES = frozenset({"CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel"})
UNSUPPORTED_ARCHITECTURES = {
    "Siglip2Model": "SigLIP 2 takes variable-resolution patch sequences (NaFlex), which vitbatch's fixed-size "
                    "preprocessing does not produce",
    "Siglip2VisionModel": "SigLIP 2 takes variable-resolution patch sequences (NaFlex), which vitbatch's "
                          "fixed-size preprocessing does not produce",
}


@dataclass(frozen=True)
class Checkpoint:
    """What a config says: its model kind, the architecture it names, and whether it holds a trained classifier."""

    model_kind: ModelKind
    architecture: str
    model_type: str = ""
    classifier: bool = False  # a head whose outputs are labels (never a projection, never absent)

    @property
    def zero_shot(self) -> bool:
        return self.model_kind is ModelKind.DUAL


def checkpoint_kind(ref: str, config: dict) -> Checkpoint:
    """The Checkpoint a config.json describes, or SpecError saying why vitbatch cannot load it."""
    if config.get("format") == "onnx":
        return Checkpoint(ModelKind.ONNX, "onnx", classifier=bool(config.get("id2label")) and config.get(
            "classifier", True))
    if "architecture" in config:
        return _timm_checkpoint(ref, config)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SpecError(f"model {ref!r}: config.json has no model_type (nor a timm 'architecture'): "
                        "pass a save_pretrained or timm save_for_hf directory")
    names = config.get("architectures") or []
    architecture = names[0] if names and isinstance(names[0], str) else ""
    if architecture in UNSUPPORTED_ARCHITECTURES:
        raise SpecError(f"model {ref!r} is a {architecture}: {UNSUPPORTED_ARCHITECTURES[architecture]}")
    if architecture.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")):
        return Checkpoint(ModelKind.CLASSIFIER, architecture, model_type, classifier=True)
    if architecture in DUAL_ARCHITECTURES:
        return Checkpoint(ModelKind.DUAL, architecture, model_type)
    if architecture in TOWER_ARCHITECTURES:
        return Checkpoint(ModelKind.VISION_TOWER, architecture, model_type)
    if model_type in BACKBONE_TYPES and (not architecture or architecture.endswith(("Model", "ForPreTraining",
                                                                                     "ForMaskedImageModeling"))):
        return Checkpoint(ModelKind.BACKBONE, architecture or model_type, model_type)
    if not architecture and model_type in ("clip", "siglip"):
        return Checkpoint(ModelKind.DUAL, model_type, model_type)
    if not architecture:  # an old config: the worker loads it as a classifier and refuses a missing head
        return Checkpoint(ModelKind.CLASSIFIER, model_type, model_type, classifier=True)
    raise SpecError(
        f"model {ref!r}: architecture {architecture!r} (model_type {model_type!r}) is not a ViT image model "
        "vitbatch runs: it loads ...ForImageClassification checkpoints, ViT/DeiT/BEiT/DINOv2/MAE backbones, "
        "CLIP and SigLIP (CLIPModel, SiglipModel and their vision models), timm models and ONNX exports"
    )


# timm pretrained tags that mean the head was trained on labels (a fine-tune), not an image projection.
_LABEL_TAGS = ("in1k", "in12k", "in21k", "in22k", "ft_", "inat", "places")


def _timm_checkpoint(ref: str, config: dict) -> Checkpoint:
    architecture = config["architecture"]
    if not isinstance(architecture, str) or not architecture:
        raise SpecError(f"model {ref!r}: config.json 'architecture' must name a timm model")
    cfg = config.get("pretrained_cfg") or {}
    args = config.get("model_args") or {}
    classes = args.get("num_classes", config.get("num_classes", cfg.get("num_classes")))
    tag = str(cfg.get("tag") or "")
    projection = ("clip" in architecture or "siglip" in architecture) and not config.get("label_names") \
        and not any(label in tag for label in _LABEL_TAGS)
    return Checkpoint(ModelKind.TIMM, architecture, classifier=bool(classes) and not projection)


def classifier_refusal(ref: str, checkpoint: Checkpoint) -> str:
    """Why `classify` cannot run on this checkpoint without --labels, and what to do instead."""
    what = {
        ModelKind.BACKBONE: f"a {checkpoint.architecture} backbone without a trained classifier",
        ModelKind.DUAL: f"a {checkpoint.architecture} image-text model, which has no fixed labels",
        ModelKind.VISION_TOWER: f"a {checkpoint.architecture}, the image side of an image-text model, without labels",
        ModelKind.TIMM: f"a timm {checkpoint.architecture} whose head is not a trained classifier "
                   "(an image projection, or no head)",
    }.get(checkpoint.model_kind, f"a {checkpoint.architecture} without trained classifier weights")
    zero_shot = " run zero-shot classify with --labels \"cat,dog,...\";" if checkpoint.zero_shot else ""
    return (f"model {ref!r} is {what}: classify would write a random head's labels. Instead:{zero_shot} "
            "run `embed` for its embeddings, or `finetune` it on labeled images (--freeze-backbone for a linear "
            "probe) and classify with the result")
