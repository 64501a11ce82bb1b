"""What a model needs of an image, and the one resize geometry every decode path follows.

`Preprocess` comes from the model itself (the HF image processor or timm's data config).
`resize_plan` says, for a source size, what to scale to and what to crop; the PIL
implementation (threads and decode processes) and the torch one (images decoded on the
device) sit side by side below and follow it; a unit test holds them equal. The overlay
of an attention map uses the same plan backwards (`seen_box`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.decode.imaging import decode_rgb
from workers.errors import BadImage

Size = tuple[int, int]  # (height, width), as torch and the model config say it

_TORCH_MODES = {int(Image.Resampling.NEAREST): "nearest", int(Image.Resampling.BILINEAR): "bilinear",
                int(Image.Resampling.BICUBIC): "bicubic"}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: resize (and maybe center crop) in uint8, then normalize.

    - `shortest_edge` unset, `cover` unset: stretch to `size`, then center-crop `crop` if set;
    - `shortest_edge`: scale the short side to it, then center-crop `crop` (default `size`),
      as torchvision's Resize(int) + CenterCrop;
    - `cover` (non-square timm models): scale to cover (h, w), then center-crop.
    """

    size: Size
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    crop: Size | None = None
    cover: Size | None = None

    @property
    def input_size(self) -> Size:
        return self.crop or self.size

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) for PIL's JPEG draft: the DCT-domain downscale stops at what the
        first resize aims at, so drafting never loses a pixel the resize would keep."""
        height, width = self.cover or ((self.shortest_edge,) * 2 if self.shortest_edge else self.size)
        return width, height

    def to_json(self) -> dict:
        return {"size": list(self.size), "resample": self.resample, "mean": list(self.mean),
                "std": list(self.std), "shortest_edge": self.shortest_edge,
                "crop": list(self.crop) if self.crop else None, "cover": list(self.cover) if self.cover else None}

    @classmethod
    def from_json(cls, data: dict) -> Preprocess:
        """The inverse of to_json: an ONNX export carries its source model's preprocessing this way."""
        def pair(v) -> Size | None:
            return (int(v[0]), int(v[1])) if v else None

        def rgb(v) -> tuple[float, float, float]:
            return float(v[0]), float(v[1]), float(v[2])

        height, width = data["size"]
        return cls((int(height), int(width)), int(data["resample"]), rgb(data["mean"]), rgb(data["std"]),
                   data.get("shortest_edge"), pair(data.get("crop")), pair(data.get("cover")))


@dataclass(frozen=True)
class Decoder:
    """Bytes -> model-sized HxWx3 uint8 for one model under one pixel limit (small, picklable:
    decode processes get a copy)."""

    prep: Preprocess
    max_pixels: int

    def image(self, data: bytes) -> Image.Image:
        return decode_rgb(data, max_pixels=self.max_pixels, draft_size=self.prep.draft_size)

    def resize(self, img: Image.Image) -> np.ndarray:
        return resize_image(img, self.prep)

    def decode(self, data: bytes) -> np.ndarray:
        """BadImage says why not."""
        return self.resize(self.image(data))


# -- the geometry ----------------------------------------------------------------------------------
def resize_plan(height: int, width: int, prep: Preprocess) -> tuple[Size, Size | None]:
    """For a source of height x width: the size to resize to, and the center crop after it (or None)."""
    if prep.cover is not None:
        ratio = min(height / prep.cover[0], width / prep.cover[1])
        return (round(height / ratio), round(width / ratio)), prep.input_size
    if prep.shortest_edge is None:  # stretch; HF processors may center-crop after it (BEiT: 256 -> 224)
        return prep.size, prep.crop
    edge, short, long = prep.shortest_edge, min(width, height), max(width, height)
    new_long = int(edge * long / short)
    return ((new_long, edge) if width <= height else (edge, new_long)), prep.input_size


def crop_offset(length: int, crop_length: int) -> int:
    """Where a center crop starts; negative when the crop is larger (torchvision pads then)."""
    if crop_length > length:
        return -((crop_length - length) // 2)
    return int(round((length - crop_length) / 2.0))


def seen_box(width: int, height: int, prep: Preprocess) -> tuple[int, int, int, int]:
    """The part of a width x height image the model saw (left, top, right, bottom): the crop
    window of `resize_plan` mapped back onto the image, clipped to it."""
    target, crop = resize_plan(height, width, prep)
    if crop is None:
        return 0, 0, width, height
    sy, sx = height / target[0], width / target[1]
    top, left = crop_offset(target[0], crop[0]), crop_offset(target[1], crop[1])
    box = (round(left * sx), round(top * sy), round((left + crop[1]) * sx), round((top + crop[0]) * sy))
    return max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)


# -- PIL: threads, decode processes, training ------------------------------------------------------
def resize_image(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """An RGB image -> HxWx3 uint8 at the model's input size."""
    if img.mode != "RGB":
        raise BadImage(f"resize needs an RGB image, got mode {img.mode}: decode it with decode_rgb")
    target, crop = resize_plan(img.height, img.width, prep)
    out = img.resize((target[1], target[0]), resample=prep.resample)
    if crop is not None:
        top, left = crop_offset(out.height, crop[0]), crop_offset(out.width, crop[1])
        out = out.crop((left, top, left + crop[1], top + crop[0]))  # past the edges: black, as torchvision pads
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


# -- torch: JPEGs decoded on the device ------------------------------------------------------------
def resize_tensor(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """NCHW uint8 (one source size) -> NCHW float32 in [0, 255], antialiased and rounded to
    uint8 levels as PIL's result is."""
    height, width = images.shape[-2:]
    target, crop = resize_plan(height, width, prep)
    mode = _TORCH_MODES.get(prep.resample, "bicubic")
    smooth = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    out = F.interpolate(images.float(), size=target, mode=mode, **smooth).round_().clamp_(0, 255)
    if crop is None:
        return out
    height, width = out.shape[-2:]
    top, left = crop_offset(height, crop[0]), crop_offset(width, crop[1])
    pad = (max(0, -left), max(0, left + crop[1] - width), max(0, -top), max(0, top + crop[0] - height))
    if any(pad):  # past the edges is black, as on the PIL side
        out = F.pad(out, pad)
        top, left = max(top, 0), max(left, 0)
    return out[..., top:top + crop[0], left:left + crop[1]]
