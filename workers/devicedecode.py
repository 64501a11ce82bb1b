"""JPEG decode on the model's device: nvJPEG through torchvision on CUDA, batched.

Only JPEGs nvJPEG handles the way PIL would go there: baseline, RGB or gray, no
EXIF rotation, within the pixel limits. Everything else (PNG, progressive,
CMYK, rotated, corrupt) takes the CPU path, which also names what is wrong
with a bad image. The resize mirrors `imaging.resize_uint8`'s geometry with
antialiased interpolation, rounded to uint8 levels as the CPU path is.
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from workers.imaging import check_size, crop_offset

_EXIF_ORIENTATION = 0x0112
_END_OF_IMAGE = b"\xff\xd9"
_MODES = {Image.NEAREST: "nearest", Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}


def device_decodable(data: bytes, max_pixels: int) -> bool:
    """True when the header says nvJPEG will decode this exactly as the CPU path would."""
    if not data.rstrip(b"\0").endswith(_END_OF_IMAGE):
        return False  # truncated: the CPU path names it; a decoder might fill the rest with grey
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=("JPEG",))
        check_size(img, max_pixels)
    except Exception:  # anything odd: the CPU path decides and explains
        return False
    return (img.mode in ("RGB", "L") and not img.info.get("progressive") and not img.info.get("progression")
            and img.getexif().get(_EXIF_ORIENTATION, 1) == 1)


def decode_batch(raws: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """CHW uint8 RGB tensors on `device`, one per JPEG; raises RuntimeError if any fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in raws]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def resize_batch(images: list[torch.Tensor], recipe) -> list[torch.Tensor]:
    """CHW uint8 images -> CHW float32 in [0, 255] at the model's input size, one
    interpolation per distinct source size (datasets hold few)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(index)
    for indices in by_size.values():
        resized = resize_nchw(torch.stack([images[i] for i in indices]), size=recipe.size, resample=recipe.resample,
                              shortest_edge=recipe.shortest_edge, crop=recipe.crop, cover=recipe.cover)
        for i, image in zip(indices, resized):
            out[i] = image
    return out


def resize_nchw(images: torch.Tensor, *, size: tuple[int, int], resample: int, shortest_edge: int | None = None,
                crop: tuple[int, int] | None = None, cover: tuple[int, int] | None = None) -> torch.Tensor:
    """NCHW uint8 (one source size) -> NCHW float32 in [0, 255], the geometry of resize_uint8."""
    height, width = images.shape[-2:]
    if cover is not None:
        ratio = min(height / cover[0], width / cover[1])
        target, crop = (round(height / ratio), round(width / ratio)), crop or size
    elif shortest_edge is None:
        target, crop = size, None
    else:
        short, long = min(width, height), max(width, height)
        new_long = int(shortest_edge * long / short)
        target = (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)
        crop = crop or size
    mode = _MODES.get(resample, "bicubic")
    smooth = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    out = F.interpolate(images.float(), size=target, mode=mode, **smooth).round_().clamp_(0, 255)
    return _center_crop(out, crop) if crop is not None else out


def _center_crop(images: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = crop_offset(height, crop[0]), crop_offset(width, crop[1])
    # Past the edges is black, as torchvision (and the CPU path) pad.
    pad = (max(0, -left), max(0, left + crop[1] - width), max(0, -top), max(0, top + crop[0] - height))
    if any(pad):
        images = F.pad(images, pad)
        top, left = max(top, 0), max(left, 0)
    return images[..., top:top + crop[0], left:left + crop[1]]
