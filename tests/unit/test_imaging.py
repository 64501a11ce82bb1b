"""decode_rgb on images made in the test: nothing is downloaded."""

import io
import random
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from workers.decode.imaging import MAX_ASPECT_RATIO, decode_rgb
from workers.errors import BadImage


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG, built by hand so no full image is ever allocated."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def noisy_jpeg(width: int = 256, height: int = 256) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG")


@pytest.fixture
def load_calls(monkeypatch):
    """Records every ImageFile.load, to prove a check ran before decoding pixels."""
    calls = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- bad objects become BadImage ---------------------------------------------


def test_empty_object_becomes_bad_image():
    with pytest.raises(BadImage, match=r"empty object \(0 bytes\)"):
        decode_rgb(b"")


def test_random_bytes_become_bad_image():
    with pytest.raises(BadImage, match="not an image"):
        decode_rgb(random.Random(0).randbytes(4096))


def test_html_named_jpg_becomes_bad_image_that_says_html():
    page = b"\n<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>"
    with pytest.raises(BadImage, match="looks like HTML"):
        decode_rgb(page)


def test_truncated_jpeg_becomes_bad_image():
    data = noisy_jpeg()
    with pytest.raises(BadImage, match="truncated or corrupt JPEG: OSError") as caught:
        decode_rgb(data[: len(data) // 2])
    assert isinstance(caught.value.__cause__, OSError)


def test_truncation_is_never_tolerated_globally():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_a_broken_header_becomes_bad_image_naming_png():
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    data[20] ^= 0xFF  # inside IHDR, so its CRC no longer matches
    with pytest.raises(BadImage, match="corrupt PNG"):
        decode_rgb(bytes(data))


def test_png_with_garbage_pixel_data_becomes_bad_image_naming_the_error():
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"definitely not zlib")
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(BadImage, match=r"truncated or corrupt PNG: \w+Error") as caught:
        decode_rgb(data)
    assert caught.value.__cause__ is not None


def test_image_over_max_pixels_becomes_bad_image_before_pixels_are_decoded(load_calls):
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(BadImage, match="10000 pixels .* over the limit of 5000"):
        decode_rgb(data, max_pixels=5000)
    assert load_calls == []


def test_decompression_bomb_png_becomes_bad_image_without_decoding(load_calls):
    bomb = png_of_zeros(20_000, 20_000)  # 400 megapixels in about 50 kB
    assert len(bomb) < 100_000
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(bomb)
    assert load_calls == []


def test_image_over_pils_warning_limit_becomes_bad_image_and_leaks_no_warning(recwarn):
    with pytest.raises(BadImage, match="100000000 pixels .* over the limit of 50000000"):
        decode_rgb(png_header_only(10_000, 10_000))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
def test_extreme_aspect_ratio_becomes_bad_image(size):
    data = encode(Image.new("L", size), "PNG")
    expected = f"aspect ratio 100000:1 is over the limit of {MAX_ASPECT_RATIO}:1"
    with pytest.raises(BadImage, match=expected):
        decode_rgb(data)


def test_aspect_ratio_at_the_limit_is_accepted():
    img = decode_rgb(encode(Image.new("L", (MAX_ASPECT_RATIO * 2, 2)), "PNG"))
    assert img.size == (MAX_ASPECT_RATIO * 2, 2)


def test_eps_named_jpg_is_refused_without_starting_ghostscript(monkeypatch):
    started = []

    def refuse(*args, **kwargs):
        started.append(args)
        raise RuntimeError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(BadImage, match="format EPS is not allowed"):
        decode_rgb(eps)
    assert started == []


# --- content decides, and every image comes back RGB -------------------------


def test_tiff_named_jpg_decodes_because_content_decides():
    data = encode(Image.new("RGB", (12, 7), (10, 200, 30)), "TIFF")
    img = decode_rgb(data)
    assert (img.mode, img.size) == ("RGB", (12, 7))
    assert img.getpixel((0, 0)) == (10, 200, 30)


def test_cmyk_jpeg_becomes_rgb():
    img = decode_rgb(encode(Image.new("CMYK", (8, 6), (255, 0, 0, 0)), "JPEG"))
    assert (img.mode, img.size) == ("RGB", (8, 6))
    red, green, blue = img.getpixel((4, 3))
    assert red < 20 and green > 235 and blue > 235  # pure cyan


@pytest.mark.parametrize(("level", "expected"), [(0, 0), (32768, 127.5), (65535, 255)])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(level, expected):
    data = encode(Image.fromarray(np.full((5, 9), level, dtype=np.uint16)), "PNG")
    img = decode_rgb(data)
    assert (img.mode, img.size) == ("RGB", (9, 5))
    assert np.abs(np.asarray(img).astype(float) - expected).max() <= 0.5


def test_transparent_palette_pixel_becomes_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    rgb = decode_rgb(encode(img, "PNG", transparency=0))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 1), (0, 0, 255, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    rgb = decode_rgb(encode(img, "PNG"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert all(126 <= channel <= 128 for channel in rgb.getpixel((1, 0)))


def test_gray_with_alpha_is_composited_on_white():
    rgb = decode_rgb(encode(Image.new("LA", (3, 3), (0, 0)), "PNG"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)


def test_grayscale_becomes_rgb_with_equal_channels():
    rgb = decode_rgb(encode(Image.new("L", (5, 4), 77), "PNG"))
    assert (rgb.mode, rgb.size, rgb.getpixel((2, 2))) == ("RGB", (5, 4), (77, 77, 77))


def test_one_bit_image_becomes_black_and_white_rgb():
    img = Image.new("1", (8, 8), 0)
    img.putpixel((3, 3), 1)
    rgb = decode_rgb(encode(img, "PNG"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((3, 3)) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    rgb = decode_rgb(data)
    assert (rgb.mode, rgb.size, rgb.getpixel((3, 3))) == ("RGB", (6, 6), (255, 0, 0))


def test_exif_orientation_6_rotates_a_40x20_image_to_20x40():
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = decode_rgb(encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif))
    assert (rgb.mode, rgb.size) == ("RGB", (20, 40))


def test_draft_decodes_a_large_jpeg_at_reduced_scale_but_not_below_the_request():
    data = encode(Image.new("RGB", (2000, 1500), (90, 120, 150)), "JPEG")
    rgb = decode_rgb(data, draft_size=(224, 224))
    assert rgb.mode == "RGB"
    assert rgb.width < 2000 and rgb.height < 1500
    assert rgb.width >= 224 and rgb.height >= 224


def test_draft_size_leaves_non_jpeg_images_at_full_size():
    data = encode(Image.new("RGB", (600, 400)), "PNG")
    assert decode_rgb(data, draft_size=(224, 224)).size == (600, 400)
