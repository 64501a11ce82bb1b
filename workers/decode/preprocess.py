"""What a model needs of an image, and the one resize geometry every decode path follows.

`Preprocess` comes from the model itself (the HF image processor or timm's data config),
rules included: transformers floors a centre crop's offset where torchvision (timm) rounds
it, and transformers' default (torchvision) processors resize a uint8 tensor with torch's
antialiased kernel where timm resizes with PIL; the pixels are that library's, exactly.
`resize_plan` says, for a source size, what to scale to and what to crop; the PIL/uint8
implementation (threads and decode processes) and the float torch one (images decoded on
the device) sit side by side below and follow it; a unit test holds them equal. The overlay
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

# Centre-crop offsets: transformers' processors floor (image_transforms.center_crop and the
# torchvision backend's int()), torchvision's CenterCrop (timm's eval transform) rounds.
CROP_ROUNDINGS = ("floor", "round")
# Who resizes: PIL (timm; transformers' PIL-backend processors) or torch's antialiased uint8
# kernel (transformers' default, torchvision-backend processors).
RESAMPLERS = ("pil", "torch")
# What each library does; an ONNX export made before these fields were written keeps its source's.
LIBRARY_RULES = {"transformers": ("floor", "torch"), "transformers-pil": ("floor", "pil"), "timm": ("round", "pil")}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: resize (and maybe center crop) in uint8, then normalize.

    - `shortest_edge` unset, `cover` unset: stretch to `size`, then center-crop `crop` if set;
    - `shortest_edge`: scale the short side to it, then center-crop `crop` (default `size`),
      as torchvision's Resize(int) + CenterCrop;
    - `cover` (non-square timm models): scale to cover (h, w), then center-crop.

    `mean` and `std` are in [0, 1] units: input = (uint8 / 255 - mean) / std (a processor's
    own rescale factor is folded into them). `crop_rounding` and `resampler` are the
    library's rules (above); their defaults are torchvision's and PIL's.
    """

    size: Size
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    crop: Size | None = None
    cover: Size | None = None
    crop_rounding: str = "round"
    resampler: str = "pil"

    def __post_init__(self) -> None:
        if self.crop_rounding not in CROP_ROUNDINGS or self.resampler not in RESAMPLERS:
            raise ValueError(f"crop_rounding {self.crop_rounding!r} / resampler {self.resampler!r}: "
                             f"expected one of {CROP_ROUNDINGS} / {RESAMPLERS}")

    @property
    def input_size(self) -> Size:
        return self.crop or self.size

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) for PIL's JPEG draft (`--jpeg-decode fast` only): the DCT-domain
        downscale stops at what the first resize aims at. Its pixels are not a full decode's."""
        height, width = self.cover or ((self.shortest_edge,) * 2 if self.shortest_edge else self.size)
        return width, height

    def to_json(self) -> dict:
        return {"size": list(self.size), "resample": self.resample, "mean": list(self.mean),
                "std": list(self.std), "shortest_edge": self.shortest_edge,
                "crop": list(self.crop) if self.crop else None, "cover": list(self.cover) if self.cover else None,
                "crop_rounding": self.crop_rounding, "resampler": self.resampler}

    @classmethod
    def from_json(cls, data: dict, library: str = "timm") -> Preprocess:
        """The inverse of to_json: an ONNX export carries its source model's preprocessing this way.
        An export written before `crop_rounding`/`resampler` existed gets `library`'s rules (its source's)."""
        def pair(v) -> Size | None:
            return (int(v[0]), int(v[1])) if v else None

        def rgb(v) -> tuple[float, float, float]:
            return float(v[0]), float(v[1]), float(v[2])

        rounding, resampler = LIBRARY_RULES[library]
        height, width = data["size"]
        return cls((int(height), int(width)), int(data["resample"]), rgb(data["mean"]), rgb(data["std"]),
                   data.get("shortest_edge"), pair(data.get("crop")), pair(data.get("cover")),
                   str(data.get("crop_rounding") or rounding), str(data.get("resampler") or resampler))


@dataclass(frozen=True)
class Decoder:
    """Bytes -> model-sized HxWx3 uint8 for one model under one pixel limit (small, picklable:
    decode processes get a copy). `fast` (`--jpeg-decode fast`) decodes a large JPEG at a
    reduced DCT scale: faster, and its pixels are no longer the checkpoint's own."""

    prep: Preprocess
    max_pixels: int
    fast: bool = False

    def image(self, data: bytes) -> Image.Image:
        draft = self.prep.draft_size if self.fast else None
        return decode_rgb(data, max_pixels=self.max_pixels, draft_size=draft)

    def resize(self, img: Image.Image) -> np.ndarray:
        return resize_image(img, self.prep)

    def decode(self, data: bytes) -> np.ndarray:
        """BadImage says why not."""
        return self.resize(self.image(data))

    @property
    def provenance(self) -> str:
        """What the marker's `compute` adds (so `computed_with` in the job's record): nothing for
        exact pixels, " jpeg-fast" where large JPEGs were drafted."""
        return " jpeg-fast" if self.fast else ""


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


def crop_offset(length: int, crop_length: int, rounding: str) -> int:
    """Where a center crop starts; negative when the crop is larger (both libraries pad then,
    the smaller half before). An odd difference puts the crop half a pixel off centre: `floor`
    (transformers) starts it there, `round` (torchvision, so timm) rounds half to even as
    Python does, one pixel later on about every other odd case."""
    if crop_length > length:
        return -((crop_length - length) // 2)
    if rounding == "floor":
        return (length - crop_length) // 2
    return int(round((length - crop_length) / 2.0))


def crop_box(height: int, width: int, crop: Size, rounding: str) -> tuple[int, int]:
    """(top, left) of a center crop of `crop` in height x width, by the library's rule."""
    return crop_offset(height, crop[0], rounding), crop_offset(width, crop[1], rounding)


def seen_box(width: int, height: int, prep: Preprocess) -> tuple[int, int, int, int]:
    """The part of a width x height image the model saw (left, top, right, bottom): the crop
    window of `resize_plan` mapped back onto the image, clipped to it."""
    target, crop = resize_plan(height, width, prep)
    if crop is None:
        return 0, 0, width, height
    sy, sx = height / target[0], width / target[1]
    top, left = crop_box(target[0], target[1], crop, prep.crop_rounding)
    box = (round(left * sx), round(top * sy), round((left + crop[1]) * sx), round((top + crop[0]) * sy))
    return max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)


# -- uint8 on the host: threads, decode processes, training ----------------------------------------
def resize_image(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """An RGB image -> HxWx3 uint8 at the model's input size, by the model's library's resampler."""
    if img.mode != "RGB":
        raise BadImage(f"resize needs an RGB image, got mode {img.mode}: decode it with decode_rgb")
    target, crop = resize_plan(img.height, img.width, prep)
    if prep.resampler == "torch":
        pixels = _torch_uint8_resize(np.array(img), target, prep.resample)  # writable: torch wraps it
    else:
        pixels = np.asarray(img.resize((target[1], target[0]), resample=prep.resample), dtype=np.uint8)
    if crop is not None:
        pixels = _crop(pixels, crop, prep.crop_rounding)
    return np.ascontiguousarray(pixels)


def _torch_uint8_resize(pixels: np.ndarray, target: Size, resample: int) -> np.ndarray:
    """What transformers' torchvision-backend processors do on the CPU: torchvision's resize of
    the uint8 tensor (torch's antialiased uint8 kernels), the very call, so the levels are theirs."""
    from torchvision.transforms.v2 import functional as tvF

    if pixels.shape[:2] == target:
        return pixels
    chw = torch.from_numpy(pixels).permute(2, 0, 1)  # a view: the kernel reads either layout alike
    out = tvF.resize(chw, list(target), interpolation=_tv_interpolation(resample), antialias=True)
    return out.permute(1, 2, 0).numpy()


def _tv_interpolation(resample: int):
    """PIL's resample code -> torchvision's mode, as transformers maps it (nearest is NEAREST_EXACT)."""
    from torchvision.transforms import InterpolationMode

    names = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
    return InterpolationMode[names[int(resample)]]


def _crop(pixels: np.ndarray, crop: Size, rounding: str) -> np.ndarray:
    """The center crop; past the edges is black, as both libraries pad."""
    height, width = pixels.shape[:2]
    top, left = crop_box(height, width, crop, rounding)
    if top < 0 or left < 0:
        padded = np.zeros((max(height, crop[0]), max(width, crop[1]), 3), dtype=np.uint8)
        padded[max(-top, 0):max(-top, 0) + height, max(-left, 0):max(-left, 0) + width] = pixels
        pixels, top, left = padded, max(top, 0), max(left, 0)
    return pixels[top:top + crop[0], left:left + crop[1]]


# -- torch: JPEGs decoded on the device ------------------------------------------------------------
def resize_tensor(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """NCHW uint8 (one source size) -> NCHW float32 in [0, 255], antialiased and rounded to
    uint8 levels as the host's result is (torchvision's own float path off the CPU), cropped by
    the model's library's rule."""
    height, width = images.shape[-2:]
    target, crop = resize_plan(height, width, prep)
    mode = _TORCH_MODES.get(prep.resample, "bicubic")
    smooth = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    out = images.float()
    if (height, width) != target:  # torchvision returns an image already at the size untouched
        out = F.interpolate(out, size=target, mode=mode, **smooth).round_().clamp_(0, 255)
    if crop is None:
        return out
    height, width = out.shape[-2:]
    top, left = crop_box(height, width, crop, prep.crop_rounding)
    pad = (max(0, -left), max(0, left + crop[1] - width), max(0, -top), max(0, top + crop[0] - height))
    if any(pad):  # past the edges is black, as on the host
        out = F.pad(out, pad)
        top, left = max(top, 0), max(left, 0)
    return out[..., top:top + crop[0], left:left + crop[1]]
