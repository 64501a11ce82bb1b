"""vitbatch's uint8 preprocessing equals timm's own eval transform, square and non-square."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from orchestrator.config import Settings
from orchestrator.store.storage import ObjectStore
from workers.decode.preprocess import resize_image
from workers.errors import ModelLoadError
from workers.models import load


def saved(tmp_path, img_size, **overlay):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=img_size,
                              patch_size=4, depth=1, embed_dim=48, num_heads=2, pretrained_cfg_overlay=overlay)
    save_for_hf(model, tmp_path, model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True)
    return tmp_path


@pytest.mark.parametrize("img_size, overlay", [((32, 32), {}), ((32, 48), {}),
                                               ((32, 32), {"crop_pct": 0.9}),  # 35: half-pixel crops
                                               ((32, 48), {"crop_mode": "squash", "crop_pct": 0.9})])
def test_preprocessing_matches_timms_eval_transform(tmp_path, img_size, overlay):
    saved(tmp_path, img_size, **overlay)
    settings = Settings()
    loaded = load(str(tmp_path), "cpu", "fp32", settings=settings, store=ObjectStore(settings))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(loaded.module))
    prep = loaded.prep
    for shape in [(90, 70), (70, 90), (40, 40), (81, 57)]:
        img = Image.fromarray((np.random.RandomState(sum(shape)).rand(*shape, 3) * 255).astype(np.uint8))
        pixels = resize_image(img, prep)
        ours = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(prep.mean).view(3, 1, 1)) \
            / torch.tensor(prep.std).view(3, 1, 1)
        reference = transform(img)
        assert ours.shape == reference.shape
        # Both resize with PIL from the same uint8 image: identical up to float rounding.
        assert (ours - reference).abs().max().item() < 1e-4


def test_timms_border_crop_mode_is_refused_with_the_reason(tmp_path):
    settings = Settings()
    with pytest.raises(ModelLoadError, match="crop_mode 'border'"):
        load(str(saved(tmp_path, (32, 32), crop_mode="border")), "cpu", "fp32", settings=settings,
             store=ObjectStore(settings))
