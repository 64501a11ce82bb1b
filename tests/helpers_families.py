"""One tiny model per ViT family vitbatch handles, saved the way users save real ones (no download).

Every model sees 32x32 inputs with 4x4 patches (an 8x8 grid; the non-square one 32x48,
8x12), 2 layers, so the family matrix stays fast on two CPU cores. `FAMILIES` says what
each one is: the tokens before the patches, whether token 0 is a CLS token, and what its
`cls` embedding is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from helpers_models import LABELS

HF_COMMON = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_labels": len(LABELS),
             "id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}
TIMM_COMMON = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
               "num_classes": len(LABELS)}


@dataclass(frozen=True)
class Family:
    name: str
    prefix: int  # tokens before the patch tokens
    class_token: bool
    cls_source: str  # "cls_token" or "pooled"
    grid: tuple[int, int] = (8, 8)


FAMILIES = {
    "hf-vit": Family("hf-vit", 1, True, "cls_token"),
    "hf-deit": Family("hf-deit", 2, True, "cls_token"),
    "hf-beit": Family("hf-beit", 1, True, "pooled"),
    "hf-dinov2": Family("hf-dinov2", 1, True, "cls_token"),
    "hf-dinov2-registers": Family("hf-dinov2-registers", 5, True, "cls_token"),
    "timm-registers": Family("timm-registers", 5, True, "cls_token"),
    "timm-no-class-token": Family("timm-no-class-token", 0, False, "pooled"),
    "timm-deit-distilled": Family("timm-deit-distilled", 2, True, "pooled"),
    "timm-non-square": Family("timm-non-square", 1, True, "cls_token", (8, 12)),
}


def _scale_head(model, head_name: str) -> None:
    """Random init gives near-uniform softmax; larger head weights make top-1 decisive."""
    import torch

    with torch.no_grad():
        getattr(model, head_name).weight.mul_(50)


def build_hf(name: str, directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (
        BeitConfig,
        BeitForImageClassification,
        DeiTConfig,
        DeiTForImageClassification,
        Dinov2Config,
        Dinov2ForImageClassification,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    classes = {
        "hf-vit": (ViTConfig, ViTForImageClassification, {"intermediate_size": 64}),
        "hf-deit": (DeiTConfig, DeiTForImageClassification, {"intermediate_size": 64}),
        "hf-beit": (BeitConfig, BeitForImageClassification, {"intermediate_size": 64}),  # use_mean_pooling
        "hf-dinov2": (Dinov2Config, Dinov2ForImageClassification, {"mlp_ratio": 2}),
        "hf-dinov2-registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification,
                                {"mlp_ratio": 2, "num_register_tokens": 4}),
    }
    config_cls, model_cls, extra = classes[name]
    model = model_cls(config_cls(**HF_COMMON, **extra))
    _scale_head(model, "classifier")
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.45, 0.5],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(directory)
    return directory


def build_timm(name: str, directory: Path, seed: int = 0) -> Path:
    import timm
    import torch

    torch.manual_seed(seed)
    args = dict(TIMM_COMMON)
    architecture = "vit_tiny_patch16_224"
    if name == "timm-registers":
        args["reg_tokens"] = 4
    elif name == "timm-no-class-token":
        args.update(class_token=False, global_pool="avg")
    elif name == "timm-deit-distilled":
        architecture = "deit_tiny_distilled_patch16_224"
    elif name == "timm-non-square":
        args["img_size"] = (32, 48)
    model = timm.create_model(architecture, pretrained=False, **args,
                              pretrained_cfg_overlay={"mean": (0.3, 0.4, 0.5), "std": (0.2, 0.25, 0.3)})
    _scale_head(model, "head")
    if name == "timm-deit-distilled":
        _scale_head(model, "head_dist")
    timm.models.save_for_hf(model, directory, model_config={"label_names": LABELS}, model_args=args,
                            safe_serialization=True)
    return directory


def build_family(name: str, directory: Path) -> Path:
    return build_hf(name, directory) if name.startswith("hf-") else build_timm(name, directory)
