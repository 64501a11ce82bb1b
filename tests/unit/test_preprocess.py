"""The one resize geometry: PIL (threads, processes, training) and torch (device decode) side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workers.decode.preprocess import (
    Decoder,
    Preprocess,
    crop_offset,
    resize_image,
    resize_plan,
    resize_tensor,
    seen_box,
)
from workers.errors import BadImage, ModelLoadError
from workers.onnx.runtime import source_library
from workers.processors import hf_preprocess


def prep(size, resample, **kwargs) -> Preprocess:
    return Preprocess(size, resample, (0.5,) * 3, (0.5,) * 3, **kwargs)




def three_stripes(width: int, height: int) -> Image.Image:
    """Red, green and blue vertical thirds: a centre crop must land on green."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for index, bounds in enumerate(np.array_split(np.arange(width), 3)):
        pixels[:, bounds, index] = 255
    return Image.fromarray(pixels)


def test_resize_without_shortest_edge_stretches_to_height_by_width():
    out = resize_image(three_stripes(300, 200), prep((32, 48), Image.Resampling.BILINEAR))
    assert (out.shape, out.dtype) == ((32, 48, 3), np.uint8)
    assert out.flags.c_contiguous


def test_resize_with_shortest_edge_scales_then_crops_the_centre():
    out = resize_image(three_stripes(300, 200), prep((64, 64), Image.Resampling.BICUBIC, shortest_edge=224, crop=(224, 160)))
    assert (out.shape, out.dtype) == ((224, 160, 3), np.uint8)
    assert out.flags.c_contiguous
    assert tuple(out[112, 80]) == (0, 255, 0)


def test_resize_with_shortest_edge_crops_to_size_when_no_crop_is_given():
    out = resize_image(three_stripes(200, 300), prep((224, 224), Image.Resampling.BICUBIC, shortest_edge=256))
    assert out.shape == (224, 224, 3)


def test_resize_rounds_the_long_side_down_like_torchvision(monkeypatch):
    sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, **kwargs):
        sizes.append(size)
        return real_resize(self, size, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    img = Image.new("RGB", (333, 250))
    resize_image(img, prep((224, 224), Image.Resampling.BILINEAR, shortest_edge=224))
    assert sizes == [(int(333 * 224 / 250), 224)]


def test_resize_refuses_non_rgb_images():
    with pytest.raises(BadImage, match="decode_rgb"):
        resize_image(Image.new("L", (4, 4)), prep((2, 2), Image.Resampling.BILINEAR))


PREPS = {
    "stretch": prep((32, 48), Image.BILINEAR),
    "stretch-then-crop": prep((40, 40), Image.BICUBIC, crop=(32, 32)),  # HF BEiT: 256 -> center 224
    "short-side-crop": prep((32, 32), Image.BICUBIC, shortest_edge=36, crop=(32, 32)),
    "cover-non-square": prep((24, 40), Image.BICUBIC, shortest_edge=27, crop=(24, 40), cover=(27, 45)),
    "crop-past-the-edges": prep((16, 16), Image.BILINEAR, shortest_edge=16, crop=(20, 20)),
    # transformers' rules: the crop offset floored, torch's uint8 resize
    "short-side-crop-floor": prep((32, 32), Image.BICUBIC, shortest_edge=36, crop=(32, 32), crop_rounding="floor",
                                  resampler="torch"),
    "crop-past-the-edges-floor": prep((16, 16), Image.BILINEAR, shortest_edge=16, crop=(21, 21), crop_rounding="floor",
                                      resampler="torch"),
}


def photo(width: int, height: int) -> Image.Image:
    rng = np.random.RandomState(width * 1000 + height)
    smooth = Image.fromarray((rng.rand(height // 4 + 1, width // 4 + 1, 3) * 255).astype(np.uint8))
    return smooth.resize((width, height), Image.BICUBIC)  # photo-like: no pixel noise to alias


@pytest.mark.parametrize("name", sorted(PREPS))
@pytest.mark.parametrize("source", [(120, 80), (80, 120), (64, 64), (203, 97)])
def test_pil_and_torch_resizes_follow_one_plan_and_agree(name, source):
    p = PREPS[name]
    img = photo(*source)
    pil = resize_image(img, p).astype(np.float32)
    nchw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0)
    ours = resize_tensor(nchw, p)[0].permute(1, 2, 0).numpy()
    assert pil.shape == ours.shape == (*p.input_size, 3)
    assert np.abs(pil - ours).mean() < 2.0  # antialiased resamplers of one geometry: a level or two


def test_a_processor_that_stretches_then_center_crops_gets_the_crop():
    """HF processors such as BEiT's resize to 256x256 and then crop 224: the crop was dropped,
    so the model got an input of the wrong size."""
    p = PREPS["stretch-then-crop"]
    assert resize_plan(80, 120, p) == ((40, 40), (32, 32))
    assert resize_image(photo(120, 80), p).shape == (32, 32, 3)


def test_seen_box_is_the_crop_window_mapped_back_onto_the_image():
    assert seen_box(120, 80, PREPS["stretch"]) == (0, 0, 120, 80)  # all of it
    # short side 80 -> 36 (scale 0.45): a 32x32 crop centred in 80x36 is 71x71 source pixels
    left, top, right, bottom = seen_box(120, 80, PREPS["short-side-crop"])
    assert (right - left, bottom - top) in {(71, 71), (71, 72), (72, 71), (72, 72)}
    assert abs((left + right) / 2 - 60) <= 1 and abs((top + bottom) / 2 - 40) <= 1
    assert seen_box(120, 80, PREPS["stretch-then-crop"]) == (12, 8, 108, 72)  # 32/40 of each side, centred


def test_a_half_pixel_crop_offset_is_floored_for_transformers_and_rounded_for_torchvision():
    """335 - 224 = 111: transformers starts the crop at 55, torchvision (timm) at round(55.5) = 56;
    Python rounds half to even, so 74.5 rounds to 74 and both agree there."""
    assert (crop_offset(335, 224, "floor"), crop_offset(335, 224, "round")) == (55, 56)
    assert (crop_offset(373, 224, "floor"), crop_offset(373, 224, "round")) == (74, 74)
    assert crop_offset(224, 224, "floor") == crop_offset(224, 224, "round") == 0
    assert crop_offset(16, 21, "floor") == crop_offset(16, 21, "round") == -2  # larger crop: pads 2 before, 3 after


def transformers_pixels(processor, img: Image.Image) -> np.ndarray:
    """The processor's own output with normalization off: its uint8 levels as floats, HWC."""
    out = processor(images=img, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("source", [(499, 333), (333, 499), (203, 97), (20, 20)])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_processors_pixels_are_reproduced_exactly(kind, source):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    processor = (CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}) if kind == "clip"
                 else SiglipImageProcessor(size={"height": 36, "width": 28}, resample=2))
    p = hf_preprocess(processor)
    assert (p.crop_rounding, p.resampler) == ("floor", "torch")
    img = photo(*source)
    assert np.array_equal(resize_image(img, p).astype(np.float32), transformers_pixels(processor, img))


def test_a_processors_rescale_factor_is_folded_into_mean_and_std():
    """(x * r - m) / s with r = 1/127.5: vitbatch's (x / 255 - m') / s' must give the same input."""
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, rescale_factor=1 / 127.5, image_mean=[1.0] * 3,
                                  image_std=[1.0] * 3)
    p = hf_preprocess(processor)
    img = photo(40, 30)
    reference = processor(images=img, return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
    ours = (resize_image(img, p) / 255 - np.array(p.mean)) / np.array(p.std)
    assert np.abs(ours - reference).max() < 1e-5


@pytest.mark.parametrize("options, why", [({"do_resize": False}, "do_resize false"),
                                          ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "longest edge")])
def test_a_processor_vitbatch_cannot_reproduce_is_refused(options, why):
    from transformers import CLIPImageProcessor

    with pytest.raises(ModelLoadError, match=why):
        hf_preprocess(CLIPImageProcessor(**options))


def test_an_export_keeps_its_rules_and_an_older_one_gets_its_source_librarys():
    p = prep((32, 32), Image.BICUBIC, shortest_edge=36, crop=(32, 32), crop_rounding="floor", resampler="torch")
    assert Preprocess.from_json(p.to_json(), "timm") == p
    older = {k: v for k, v in p.to_json().items() if k not in ("crop_rounding", "resampler")}
    hf = Preprocess.from_json(older, source_library({"source": {"family": "hf image classifier"}}))
    timm = Preprocess.from_json(older, source_library({"source": {"family": "timm"}}))
    assert (hf.crop_rounding, hf.resampler) == ("floor", "torch")
    assert (timm.crop_rounding, timm.resampler) == ("round", "pil")


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_the_device_resize_crops_where_the_host_does(rounding):
    """A source already at the resize target isolates the crop: 75 - 32 = 43, so the crop
    starts at 21 (floor) or 22 (round) on both paths, pixel for pixel."""
    p = prep((32, 32), Image.BILINEAR, shortest_edge=36, crop=(32, 32), crop_rounding=rounding)
    img = photo(75, 36)
    nchw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0)
    on_device = resize_tensor(nchw, p)[0].permute(1, 2, 0).numpy()
    expected_left = 21 if rounding == "floor" else 22
    assert np.array_equal(on_device, resize_image(img, p).astype(np.float32))
    assert np.array_equal(on_device, np.asarray(img)[2:34, expected_left:expected_left + 32].astype(np.float32))


def test_a_decoder_decodes_jpegs_at_full_scale_unless_fast():
    """PIL's draft would decode this 1000x800 JPEG at half scale for a 224 input: only `fast` lets it."""
    import io

    buffer = io.BytesIO()
    photo(1000, 800).save(buffer, "JPEG", quality=90)
    p = prep((224, 224), Image.BILINEAR)
    assert Decoder(p, 10**8).image(buffer.getvalue()).size == (1000, 800)
    assert Decoder(p, 10**8, fast=True).image(buffer.getvalue()).size == (500, 400)
    assert (Decoder(p, 10**8).provenance, Decoder(p, 10**8, fast=True).provenance) == ("", " jpeg-fast")
