"""JPEG decode on the model's device: nvJPEG through torchvision on CUDA, batched.

Only JPEGs nvJPEG handles the way PIL would go there: baseline, RGB or gray, no
EXIF rotation, within the pixel limits. Everything else (PNG, progressive,
CMYK, rotated, corrupt) takes the CPU path, which also names what is wrong
with a bad image. The resize is `preprocess.resize_tensor`: the CPU path's geometry,
antialiased, rounded to uint8 levels as the CPU path is.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from workers.decode.imaging import check_size
from workers.decode.preprocess import Preprocess, resize_tensor

_EXIF_ORIENTATION = 0x0112
_END_OF_IMAGE = b"\xff\xd9"


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


def resize_batch(images: list[torch.Tensor], prep: Preprocess) -> list[torch.Tensor]:
    """CHW uint8 images -> CHW float32 in [0, 255] at the model's input size, one
    interpolation per distinct source size (datasets hold few)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        by_size.setdefault((height, width), []).append(index)
    for indices in by_size.values():
        for i, image in zip(indices, resize_tensor(torch.stack([images[i] for i in indices]), prep)):
            out[i] = image
    return [image for image in out if image is not None]  # every one: the sizes cover them all
