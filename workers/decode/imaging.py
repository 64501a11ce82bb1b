"""Turn untrusted object bytes into RGB images (workers.decode.preprocess sizes them for a model).

`decode_rgb` turns every failure into `BadImage` with a reason a user can
act on; it never returns None or lets a PIL exception escape.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from workers.errors import BadImage

# Content sniffing picks the decoder; the file extension is never consulted.
# EPS/PS are left out because loading them runs Ghostscript on user data.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Wider than any real photo or scan; beyond it, resize-and-crop leaves
# a sliver of the image, or a 1-pixel side that resamples to noise.
MAX_ASPECT_RATIO = 100

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_rgb(
    data: bytes,
    *,
    max_pixels: int = 50_000_000,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `data` into a loaded RGB image, EXIF orientation applied.

    `max_pixels` is checked against the header before any pixel is decoded.
    `draft_size` is (width, height) as in `PIL.Image.draft`: a JPEG is
    decoded at the smallest DCT scale still at least that large. Only
    `--jpeg-decode fast` asks for it: a drafted JPEG's pixels differ from a
    full decode's (what every reference library reads) by about a grey level.

    Where this differs from transformers' `load_image` (convert("RGB")), on
    purpose: alpha is composited on white (as transformers' `convert_to_rgb`
    does), 16-bit samples are scaled to 8 bits rather than clipped.
    """
    if not data:
        raise BadImage("empty object (0 bytes)")
    with warnings.catch_warnings():
        # Our max_pixels check below decides; PIL's warning would only
        # repeat it into the logs once per bad object. PIL's own
        # DecompressionBombError (at 2x its limit) still applies.
        # catch_warnings is not thread-safe; the worst a race does here is
        # leave this one warning silenced process-wide.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data)
        check_size(img, max_pixels)
        return _load_rgb(img, draft_size)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage(f"image is a decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        # PIL's message only names the BytesIO; say what the bytes look like.
        raise BadImage(_describe_unreadable(data)) from e
    except Exception as e:
        raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from e


def _load_rgb(img: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    fmt = img.format
    try:
        if draft_size is not None and fmt == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise BadImage(f"truncated or corrupt {fmt}: {type(e).__name__}: {e}") from e


def _describe_unreadable(data: bytes) -> str:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: looks like HTML"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "not an image: looks like XML or SVG"
    fmt = _sniff_format(data[:64])
    if fmt in ALLOWED_FORMATS:
        # Image.open swallows header errors (bad CRC, bad IHDR) this way.
        return f"corrupt {fmt}: its header could not be read"
    if fmt is not None:
        return f"format {fmt} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})"
    return f"not an image: unrecognized content starting with {data[:8]!r}"


def _sniff_format(prefix: bytes) -> str | None:
    """Name the PIL format whose magic bytes match, without opening anything."""
    Image.init()
    for fmt, (_factory, accept) in Image.OPEN.items():
        # Plugins without an accept check (TGA, SPIDER, ...) would claim anything.
        if accept is not None and accept(prefix):
            return fmt
    return None


def check_size(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImage(f"image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise BadImage(
            f"image has {width * height} pixels ({width}x{height}), "
            f"over the limit of {max_pixels}"
        )
    long_side, short_side = max(width, height), min(width, height)
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise BadImage(
            f"image is {width}x{height}: aspect ratio {long_side / short_side:.0f}:1 "
            f"is over the limit of {MAX_ASPECT_RATIO}:1"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _16BIT_MODES:
        return _16bit_to_rgb(img)
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        return _flatten_on_white(img)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise BadImage(f"cannot convert image mode {img.mode} to RGB: {e}") from e


def _16bit_to_rgb(img: Image.Image) -> Image.Image:
    # convert("L") clips 16-bit values at 255, turning most images white.
    # Mode "I" holds 16-bit PNG/TIFF samples too; wider values are clipped.
    levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
    gray = np.rint(levels / 257).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _flatten_on_white(img: Image.Image) -> Image.Image:
    # Models were trained on photos; black behind transparent logos would
    # be a colour that is not in the picture.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
