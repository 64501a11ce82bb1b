"""Tiny ViT models saved the way users save real ones, built on the CPU with no download.

Preprocessing values are deliberately not the libraries' defaults, so a test can
tell "read from the model" apart from "hard-coded".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from support import build_tiny_vit

if TYPE_CHECKING:
    from workers.loaded import LoadedModel

LABELS = ["cat", "dog", "eel", "fox", "gnu"]

# HF processor: ViTImageProcessor's defaults are 224, bilinear (2), mean = std = 0.5.
HF_SIZE = 32
HF_MEAN = (0.4, 0.45, 0.5)
HF_STD = (0.2, 0.25, 0.3)
HF_RESAMPLE = 3  # PIL bicubic

# timm data config: the model's defaults are bicubic, crop_pct 0.9, mean = std = 0.5.
TIMM_SIZE = 32
TIMM_MEAN = (0.3, 0.4, 0.5)
TIMM_STD = (0.2, 0.25, 0.3)
TIMM_CROP_PCT = 0.875
TIMM_RESAMPLE = 2  # PIL bilinear
TIMM_SHORTEST_EDGE = 36  # floor(32 / 0.875), as timm's eval transform resizes


def load_model(ref: str, **options) -> LoadedModel:
    """workers.models.load as a test's edge calls it: Settings from the environment, a store built on them."""
    from orchestrator.config import Settings
    from orchestrator.store.storage import ObjectStore
    from workers import models

    settings = Settings()
    return models.load(ref, settings=settings, store=ObjectStore(settings), **options)


def build_hf_vit(directory: Path, seed: int = 2) -> Path:
    """A 2-layer ViT classifier + image processor, as `save_pretrained` writes them.

    At random init the CLS token barely depends on the image; with seed 0 every test
    image gets the same class. Seed 2 tells the pipeline tests' images apart (3 classes).
    """
    return build_tiny_vit(directory, image_size=HF_SIZE, seed=seed, labels=LABELS, hidden_size=32, layers=2, heads=2,
                          head_scale=50, mean=HF_MEAN, std=HF_STD, resample=HF_RESAMPLE)


def build_timm_vit(directory: Path, seed: int = 0) -> Path:
    """A timm ViT-Tiny shrunk to 32 px, saved with `save_for_hf` (config.json + safetensors)."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=len(LABELS), img_size=TIMM_SIZE, patch_size=4,
        pretrained_cfg_overlay={"mean": TIMM_MEAN, "std": TIMM_STD, "crop_pct": TIMM_CROP_PCT,
                                "interpolation": "bilinear"},
    )
    timm.models.save_for_hf(model, directory, model_config={"label_names": LABELS}, safe_serialization=True)
    return directory
