"""The one resize geometry: PIL (threads, processes, training) and torch (device decode) side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workers.decode.preprocess import Preprocess, resize_image, resize_plan, resize_tensor, seen_box
from workers.errors import BadImage


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
