"""vitbatch's uint8 preprocessing equals timm's own eval transform, square and non-square."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from orchestrator.config import Settings
from orchestrator.storage import ObjectStore
from workers.decode.preprocess import resize_image
from workers.models import load


@pytest.mark.parametrize("img_size", [(32, 32), (32, 48)])
def test_preprocessing_matches_timms_eval_transform(tmp_path, img_size):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=img_size,
                              patch_size=4, depth=1, embed_dim=48, num_heads=2)
    save_for_hf(model, tmp_path, model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True)
    settings = Settings()
    loaded = load(str(tmp_path), "cpu", "fp32", settings=settings, store=ObjectStore(settings))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(loaded.module))
    prep = loaded.prep
    for shape in [(90, 70), (70, 90), (40, 40)]:
        img = Image.fromarray((np.random.RandomState(sum(shape)).rand(*shape, 3) * 255).astype(np.uint8))
        pixels = resize_image(img, prep)
        ours = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(prep.mean).view(3, 1, 1)) \
            / torch.tensor(prep.std).view(3, 1, 1)
        reference = transform(img)
        assert ours.shape == reference.shape
        # Both resize with PIL from the same uint8 image: identical up to float rounding.
        assert (ours - reference).abs().max().item() < 1e-4
