"""A checkpoint's own preprocessing, read from its library: the HF image processor, or timm's data config.

The result is a `Preprocess` that reproduces that library's pixels, rules included (see
workers/decode/preprocess.py): transformers' processors floor a centre crop's offset and,
with the default torchvision backend, resize the uint8 tensor with torch's kernels; timm's
eval transform resizes with PIL and crops with torchvision's rounding. What vitbatch cannot
reproduce is refused with the reason, never approximated.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from workers.decode.preprocess import LIBRARY_RULES, Preprocess
from workers.errors import ModelLoadError

_RESAMPLE = {name: int(Image.Resampling[name.upper()])  # timm's interpolation names -> PIL's (bilinear: 2, ...)
             for name in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")}
_UNIT = 1 / 255  # vitbatch's Preprocess mean/std are in [0, 1] units of uint8 / 255


def _field(size: Any, name: str) -> Any:
    """A size field from transformers' SizeDict (5.x) or a plain dict (older processors)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def _resample_code(value: Any) -> int:
    """PIL's resample code, from an int, a PILImageResampling or a torchvision InterpolationMode."""
    if value is None:
        return int(Image.Resampling.BILINEAR)
    if hasattr(value, "value") and isinstance(value.value, str):  # InterpolationMode("bicubic")
        name = value.value.replace("-exact", "")
        return _RESAMPLE[name]
    return int(value)


RGB = tuple[float, float, float]


def _normalization(processor: Any) -> tuple[RGB, RGB]:
    """mean and std in uint8/255 units with the processor's rescale folded in:
    (x * r - m) / s == (x / 255 - m / (255 r)) / (s / (255 r))."""
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    normalize = getattr(processor, "do_normalize", True)
    mean = [float(m) for m in processor.image_mean] if normalize else [0.0, 0.0, 0.0]
    std = [float(s) for s in processor.image_std] if normalize else [1.0, 1.0, 1.0]
    scale = _UNIT / rescale
    return _rgb([m * scale for m in mean]), _rgb([s * scale for s in std])


def _rgb(values: Any) -> RGB:
    return float(values[0]), float(values[1]), float(values[2])


def hf_preprocess(processor: Any) -> Preprocess:
    """What `processor(images=load_image(path))` does, as a Preprocess (the same pixels)."""
    if getattr(processor, "do_resize", True) is False:
        raise ModelLoadError(f"{type(processor).__name__} has do_resize false: batches need one input size; "
                             "save the processor with do_resize true")
    size = processor.size
    if _field(size, "longest_edge") or _field(size, "max_height"):
        raise ModelLoadError(f"{type(processor).__name__} resizes to a longest edge or a maximum ({size}): "
                             "vitbatch reproduces shortest_edge or height x width processors only")
    rounding, resampler = LIBRARY_RULES["transformers" if getattr(processor, "backend", "pil") == "torchvision"
                                        else "transformers-pil"]
    resample = _resample_code(getattr(processor, "resample", None))
    mean, std = _normalization(processor)
    crop = None
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop_size:
        crop = (int(_field(crop_size, "height")), int(_field(crop_size, "width")))
    if _field(size, "shortest_edge"):
        edge = int(_field(size, "shortest_edge"))
        # Without a crop the long side varies per image: the square crop of the edge keeps one input size.
        return Preprocess((edge, edge), resample, mean, std, shortest_edge=edge, crop=crop or (edge, edge),
                          crop_rounding=rounding, resampler=resampler)
    return Preprocess((int(_field(size, "height")), int(_field(size, "width"))), resample, mean, std, crop=crop,
                      crop_rounding=rounding, resampler=resampler)


def timm_preprocess(module: Any) -> Preprocess:
    """timm's eval transform (`create_transform(**resolve_data_config(model=module))`) as a Preprocess:
    center mode resizes the short side to floor(size / crop_pct) (non-square inputs: to cover the
    scaled size), squash mode stretches to the scaled size; then a centre crop to the input size."""
    from timm.data.model_config import resolve_input_data_config

    # The input size the model has now (img_size=32 overrides its source cfg's 224), as save_for_hf exports it.
    config = resolve_input_data_config(module)
    height, width = config["input_size"][1:]
    resample = _RESAMPLE.get(config.get("interpolation", "bicubic"), int(Image.Resampling.BICUBIC))
    crop_pct = float(config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT where a cfg has none
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    rounding, resampler = LIBRARY_RULES["timm"]
    common: dict[str, Any] = {"crop": (height, width), "crop_rounding": rounding, "resampler": resampler}
    mode = config.get("crop_mode") or "center"
    mean, std = _rgb(config["mean"]), _rgb(config["std"])
    if mode == "squash":
        return Preprocess(scaled, resample, mean, std, **common)
    if mode != "center":
        raise ModelLoadError(f"timm crop_mode {mode!r} (letterbox padding) is not reproduced by vitbatch: "
                             "set the model's pretrained_cfg crop_mode to 'center' or 'squash'")
    cover = scaled if scaled[0] != scaled[1] else None  # timm: ResizeKeepRatio, else Resize(short side)
    return Preprocess((height, width), resample, mean, std, shortest_edge=scaled[0], cover=cover, **common)
