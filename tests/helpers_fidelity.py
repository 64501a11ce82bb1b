"""Tiny checkpoints of six published families, saved with the preprocessing their hub checkpoints
publish (written literally), and image files of every kind vitbatch reads.

The models are small (2 layers, hidden 32-48) at the real 224 input, so their preprocessing is
the published one, pixel for pixel. Their patch embeddings are scaled up so the image embedding
follows the pixels closely: a one-pixel crop shift or a reduced-scale JPEG decode moves it
measurably (tests/models/test_fidelity.py shows both do).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# preprocessor_config.json as the hub publishes it for each checkpoint (2026-12), literally.
VIT_FEATURE_EXTRACTOR = {  # google/vit-base-patch16-224-in21k and google/vit-base-patch16-224: stretch, bilinear
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224,
}
CLIP_B32 = {  # openai/clip-vit-base-patch32: short side 224, centre crop 224, bicubic, convert_rgb
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
SIGLIP_B16 = {  # google/siglip-base-patch16-224: stretch to 224x224, bicubic
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
}
DINOV2_SMALL = {  # facebook/dinov2-small: short side 256, centre crop 224, bicubic
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}
TIMM_VIT_B16 = "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # timm's cfg: crop_pct 0.9, bicubic, mean = std = 0.5

PATCH_GAIN = 8.0  # patch embedding weights x this, and
QK_GAIN = 16.0  # query and key weights x this: sharp attention, so the CLS output follows a few patches' pixels
_QK_WEIGHTS = ("attention.query.weight", "attention.key.weight", "q_proj.weight", "k_proj.weight")


def _gain(model, conv) -> None:
    """Random init averages every patch into the CLS token, which then barely depends on the
    pixels; larger patch weights and peaked attention make it follow them."""
    import torch

    with torch.no_grad():
        conv.weight.mul_(PATCH_GAIN)
        for name, weight in model.named_parameters():
            if name.endswith(_QK_WEIGHTS):
                weight.mul_(QK_GAIN)
            elif name.endswith("attn.qkv.weight"):  # timm: q, k and v stacked
                weight[: 2 * weight.shape[1]].mul_(QK_GAIN)


def _save_hf(model, directory: Path, processor: dict) -> Path:
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory


def _vision(**extra) -> dict:
    return {"image_size": 224, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, **extra}


def _text() -> dict:
    return {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16}


def build_vit_in21k(directory: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**_vision(patch_size=16)), add_pooling_layer=False)
    _gain(model, model.embeddings.patch_embeddings.projection)
    return _save_hf(model, directory, VIT_FEATURE_EXTRACTOR)


def build_vit_imagenet(directory: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    labels = {0: "tabby", 1: "goldfish", 2: "volcano"}
    model = ViTForImageClassification(ViTConfig(**_vision(patch_size=16), id2label=labels,
                                                label2id={v: k for k, v in labels.items()}))
    _gain(model, model.vit.embeddings.patch_embeddings.projection)
    return _save_hf(model, directory, VIT_FEATURE_EXTRACTOR)


def build_clip_b32(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(text_config=_text(), vision_config=_vision(patch_size=32), projection_dim=16))
    _gain(model, model.vision_model.embeddings.patch_embedding)
    return _save_hf(model, directory, CLIP_B32)


def build_siglip_b16(directory: Path) -> Path:
    from transformers import SiglipConfig, SiglipModel

    model = SiglipModel(SiglipConfig(text_config=_text(), vision_config=_vision(patch_size=16)))
    _gain(model, model.vision_model.embeddings.patch_embedding)
    return _save_hf(model, directory, SIGLIP_B16)


def build_dinov2_small(directory: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(image_size=224, patch_size=14, hidden_size=32, mlp_ratio=2, num_hidden_layers=2,
                          num_attention_heads=2)
    model = Dinov2Model(config)
    _gain(model, model.embeddings.patch_embeddings.projection)
    return _save_hf(model, directory, DINOV2_SMALL)


def build_timm_vit_b16(directory: Path) -> Path:
    import timm

    args = {"embed_dim": 48, "depth": 2, "num_heads": 2, "num_classes": 3}
    model = timm.create_model(TIMM_VIT_B16, pretrained=False, **args)
    _gain(model, model.patch_embed.proj)
    timm.models.save_for_hf(model, directory, model_config={"label_names": ["a", "b", "c"]}, model_args=args,
                            safe_serialization=True)
    return directory


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "vit-in21k": build_vit_in21k, "vit-imagenet": build_vit_imagenet, "clip-b32": build_clip_b32,
    "siglip-b16": build_siglip_b16, "dinov2-small": build_dinov2_small, "timm-vit-b16": build_timm_vit_b16,
}


# -- the files ---------------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real photograph (scikit-learn's, shipped offline) cut and scaled to width x height, with a
    fine texture on top so a one-pixel shift changes what every patch sees."""
    from sklearn.datasets import load_sample_images

    source = Image.fromarray(load_sample_images().images[seed % 2]).resize((width, height), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    texture = rng.integers(-24, 25, size=(height, width, 1))
    return Image.fromarray(np.clip(np.asarray(source, dtype=np.int16) + texture, 0, 255).astype(np.uint8))


def tiled(width: int, height: int) -> Image.Image:
    """A large photo with detail at full resolution: the sample photos tiled at their own scale
    (an upscaled photo is smooth, and a reduced-scale decode of it loses nothing)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    canvas = Image.new("RGB", (width, height))
    for index, (top, left) in enumerate((t, x) for t in range(0, height, 427) for x in range(0, width, 640)):
        tile = photos[index % 2]
        canvas.paste(tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if index % 3 == 1 else tile, (left, top))
    return canvas


def _encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    return _encoded(img, "JPEG", quality=92, exif=exif)


def _alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _sixteen_bit(img: Image.Image) -> Image.Image:
    gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257 + 100
    return Image.fromarray(gray.astype(np.uint16))


def _animated_gif(img: Image.Image) -> bytes:
    frames = [img.convert("P", palette=Image.Palette.ADAPTIVE), img.rotate(180).convert("P")]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# Renderings vitbatch chooses on purpose (README "Pixels"): alpha composited on white, 16-bit scaled.
DELIBERATE = {"rgba-331x497.png": "alpha", "palette-alpha-257x379.png": "alpha", "gray16-333x499.png": "16-bit"}


def image_files() -> dict[str, bytes]:
    """Every kind of file the fidelity test reads, odd sizes whose centre crops fall on half pixels."""
    portrait, landscape = photo(333, 499), photo(499, 333, seed=1)
    palette_alpha = photo(257, 379).convert("P", palette=Image.Palette.ADAPTIVE)
    counts, colours = np.bincount(np.asarray(palette_alpha).ravel()), np.reshape(palette_alpha.getpalette(), (-1, 3))
    clear = min(np.argsort(counts)[-16:], key=lambda i: colours[i].sum())  # a common dark colour turns transparent
    return {
        "portrait-333x499.jpg": _encoded(portrait, "JPEG", quality=92),
        "landscape-499x333.jpg": _encoded(landscape, "JPEG", quality=92),
        "large-4000x3000.jpg": _encoded(tiled(4000, 3000), "JPEG", quality=90),
        "tiny-20x20.png": _encoded(photo(20, 20), "PNG"),
        "gray-335x501.png": _encoded(photo(335, 501).convert("L"), "PNG"),
        "palette-337x503.png": _encoded(photo(337, 503, seed=1).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette-alpha-257x379.png": _encoded(palette_alpha, "PNG", transparency=int(clear)),
        "rgba-331x497.png": _encoded(_alpha(photo(331, 497)), "PNG"),
        "cmyk-499x333.jpg": _encoded(landscape.convert("CMYK"), "JPEG", quality=92),
        "exif6-499x333.jpg": _exif_rotated(landscape),
        "gray16-333x499.png": _encoded(_sixteen_bit(portrait), "PNG"),
        "webp-333x499.webp": _encoded(portrait, "WEBP", quality=90),
        "progressive-1001x667.jpg": _encoded(photo(1001, 667), "JPEG", quality=90, progressive=True),
        "animated-333x499.gif": _animated_gif(portrait),
    }


def reference_rendering(name: str, path: Path) -> Image.Image:
    """What the reference processor is given: transformers' `load_image`, except for the files
    vitbatch renders differently on purpose, which get that rendering done the library's way:
    alpha by transformers' own `convert_to_rgb` (white behind), 16-bit samples scaled to 8 bits."""
    from PIL import ImageOps
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    if DELIBERATE.get(name) == "alpha":
        return Image.fromarray(convert_to_rgb(ImageOps.exif_transpose(Image.open(path)), return_numpy=True))
    if DELIBERATE.get(name) == "16-bit":
        levels = np.asarray(Image.open(path), dtype=np.float64)
        return Image.fromarray(np.rint(levels / 257).astype(np.uint8)).convert("RGB")
    return load_image(str(path))
