"""What a fine-tune trains: a model with a classifier sized from the data's labels, built from
a --config or from a checkpoint of any kind orchestrator.jobspec.modelkinds tells apart.

- an image classifier keeps its backbone and gets a new head where its labels differ;
- a backbone (ViTModel, Dinov2Model, ...) gets a fresh head on its own weights:
  AutoModelForImageClassification loads them under its base_model_prefix;
- MAE (ViTMAEModel, ViTMAEForPreTraining) has no classification class: its encoder's weights
  go into a ViTForImageClassification, whose layers bear the same names;
- CLIPModel / SiglipModel load into CLIP/SiglipForImageClassification (the image tower and a
  head on its mean patch token); a vision tower alone is copied into one of those;
- timm models get timm's new head (`num_classes`).

Every HF start is checked: a weight the checkpoint lacked outside the new head means the
backbone would train from random values, and the load fails instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import SpecError
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind
from workers import models
from workers.context import WorkerContext
from workers.decode.preprocess import Preprocess
from workers.errors import ModelLoadError
from workers.modelfiles import check_model_dir, local_model_dir

# ViTConfig fields ViTMAEConfig shares: the encoder both build from them is the same module tree.
_MAE_ENCODER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                       "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                       "image_size", "patch_size", "num_channels", "qkv_bias")
# vision tower model_type -> (image-text config, its classification class), by transformers name.
_TOWER_CLASSIFIERS = {"clip_vision_model": ("CLIPConfig", "CLIPForImageClassification"),
                      "siglip_vision_model": ("SiglipConfig", "SiglipForImageClassification")}


class TimmForTraining(torch.nn.Module):
    """A timm classifier behind the interface Trainer calls, saved the way HF models save."""

    def __init__(self, model: torch.nn.Module, label_names: list[str]) -> None:
        super().__init__()
        self.model, self.label_names = model, label_names

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits.float(), labels)
        return out

    def save_pretrained(self, dest: Path) -> None:
        import timm

        timm.models.save_for_hf(self.model, str(dest), model_config={"label_names": self.label_names},
                                safe_serialization=True)


@dataclass
class Built:
    model: Any  # what Trainer trains: an HF model or a TimmForTraining; `save_pretrained(dest)` saves it
    classifier: torch.nn.Module  # the head sized from the labels: --freeze-backbone trains it alone
    prep: Preprocess  # the inference preprocessing the saved model will get
    processor: Any = None  # HF image processor, saved next to the weights

    def freeze_backbone(self) -> None:
        self.model.requires_grad_(False)
        self.classifier.requires_grad_(True)

    def save(self, dest: Path) -> Path:
        self.model.save_pretrained(dest)
        if self.processor is not None:
            self.processor.save_pretrained(dest)
        return dest


def build_model(spec, names: list[str], ctx: WorkerContext) -> Built:
    # num_labels follows from id2label; passing both warns when a checkpoint had other labels.
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if spec.config is None:
        return from_pretrained(spec.model, labels, ctx)
    try:
        return _from_config(dict(spec.config), labels)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # unknown arch, bad sizes...
        raise SpecError(f"--config does not build a model: {type(e).__name__}: {e}") from e


def _from_config(config: dict, labels: dict) -> Built:
    if "architecture" in config:
        import timm

        return _timm(timm.create_model(config.pop("architecture"), pretrained=False,
                                       num_classes=len(labels["id2label"]), **config), labels)
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
    size: Any = module.config.image_size  # an int here: ViTConfig's square default, or --config's
    return _hf(module, ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3))


def from_pretrained(ref: str, labels: dict, ctx: WorkerContext) -> Built:
    path = local_model_dir(ref, ctx.store, ctx.settings)
    # The same rules as inference: no remote code, safetensors only.
    config = check_model_dir(path) if path is not None else None
    name = str(path) if path is not None else ref.split(":", 1)[1]
    checkpoint = Checkpoint(ModelKind.TIMM, name) if ref.startswith("timm:") else models.hf_checkpoint(ref, name, config)
    try:
        if checkpoint.model_kind is ModelKind.TIMM:
            import timm

            source = f"local-dir:{name}" if path is not None else name
            return _timm(timm.create_model(source, pretrained=True, num_classes=len(labels["id2label"])), labels)
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
        return _hf(_hf_start(name, checkpoint, labels), processor)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model {ref!r} cannot be loaded ({e}): pass a local directory or s3:// URI") from e


_OPTIONS: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "dtype": torch.float32}  # fp32 master weights


def _hf_start(name: str, checkpoint: Checkpoint, labels: dict) -> torch.nn.Module:
    """The HF classifier a checkpoint starts: its own weights, a head for `labels`."""
    if checkpoint.model_type == "vit_mae":
        return _from_mae(name, labels)
    if checkpoint.model_kind is ModelKind.VISION_TOWER:
        return _from_tower(name, checkpoint, labels)
    from transformers import AutoModelForImageClassification

    module, info = AutoModelForImageClassification.from_pretrained(
        name, ignore_mismatched_sizes=True, output_loading_info=True, **_OPTIONS, **labels)
    fresh = sorted(key for key in info["missing_keys"] if not key.startswith("classifier."))
    if fresh:  # the backbone did not come from the checkpoint: training it would start from noise
        raise ModelLoadError(f"{name}: {len(fresh)} backbone weights are not in the checkpoint ({', '.join(fresh[:3])}"
                             f"{', ...' if len(fresh) > 3 else ''}): it is not a {checkpoint.architecture} saved by "
                             "transformers")
    return module


def _from_mae(name: str, labels: dict) -> torch.nn.Module:
    """ViTForImageClassification over an MAE encoder: the same layer names, under `vit.` instead of
    the MAE model's root; MAE's fixed sin-cos position embeddings become ViT's (trainable) ones."""
    from transformers import ViTConfig, ViTForImageClassification, ViTMAEModel

    encoder = ViTMAEModel.from_pretrained(name, mask_ratio=0.0, **_OPTIONS)
    config = ViTConfig(**{field: getattr(encoder.config, field) for field in _MAE_ENCODER_FIELDS}, **labels)
    module = ViTForImageClassification(config)
    module.vit.load_state_dict(encoder.state_dict(), strict=True)
    return module


def _from_tower(name: str, checkpoint: Checkpoint, labels: dict) -> torch.nn.Module:
    """CLIP/SigLIP's classification class around a vision tower saved alone (the text side is not used)."""
    import transformers

    tower = getattr(transformers, checkpoint.architecture).from_pretrained(name, **_OPTIONS)
    config_class, classifier_class = (getattr(transformers, n) for n in _TOWER_CLASSIFIERS[tower.config.model_type])
    module = classifier_class(config_class(vision_config=tower.config.to_dict(), **labels))
    # The projection of CLIPVisionModelWithProjection is left behind: the head reads the tower's tokens.
    module.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict(), strict=True)
    return module


def _hf(module: torch.nn.Module, processor) -> Built:
    return Built(module, module.get_submodule("classifier"), models.hf_preprocess(processor), processor)


def _timm(module: Any, labels: dict) -> Built:  # a timm model: get_classifier()
    names = [labels["id2label"][i] for i in range(len(labels["id2label"]))]
    return Built(TimmForTraining(module, names), module.get_classifier(), models.timm_preprocess(module))
