"""A real-image set with known near-duplicates, for dedup and neighbors tests.

Distinct images: scikit-image's bundled photos, its 200 LFW faces and scikit-learn's digits
(all shipped inside the wheels: no download). Near-duplicates of some of them: re-encoded at
other JPEG qualities, resized, slightly cropped, flipped.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PHOTOS = ["astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
          "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
          "text", "colorwheel", "clock", "cat"]


def distinct_images(n_faces: int = 60, n_digits: int = 60) -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_digits

    images = {}
    for name in PHOTOS:
        array = getattr(data, name)()
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).astype(np.uint8) if array.max() <= 1 else array.astype(np.uint8)
        images[f"photo-{name}"] = Image.fromarray(array).convert("RGB")
    for i, face in enumerate(data.lfw_subset()[:n_faces]):
        images[f"face-{i:03d}"] = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((64, 64))
    for i, digit in enumerate(load_digits().images[:n_digits]):
        images[f"digit-{i:04d}"] = Image.fromarray((digit * 16).astype(np.uint8)).convert("RGB").resize((48, 48))
    return images


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def variants(image: Image.Image) -> dict[str, bytes]:
    """Near-duplicates: other JPEG qualities, resized, cropped by 3% a side, mirrored."""
    w, h = image.size
    dx, dy = max(1, w * 3 // 100), max(1, h * 3 // 100)
    return {"q60": jpeg(image, 60), "q30": jpeg(image, 30), "resized": jpeg(image.resize((w * 4 // 5, h * 4 // 5)), 90),
            "cropped": jpeg(image.crop((dx, dy, w - dx, h - dy)), 90), "flipped": jpeg(ImageOps.mirror(image), 90)}


def write_set(folder: Path, every: int = 4) -> dict[str, str]:
    """Write the distinct images (JPEG q95) and the variants of every `every`-th one; returns
    variant key -> original key (the planted pairs)."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = {}
    for i, (name, image) in enumerate(distinct_images().items()):
        (folder / f"{name}.jpg").write_bytes(jpeg(image, 95))
        if i % every:
            continue
        for how, data in variants(image).items():
            (folder / f"{name}-{how}.jpg").write_bytes(data)
            planted[f"{name}-{how}.jpg"] = f"{name}.jpg"
    return planted
