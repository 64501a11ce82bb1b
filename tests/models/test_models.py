"""workers.models.load on tiny models saved in tmp dirs: preprocessing and labels come from the model."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from helpers_models import (
    HF_MEAN,
    HF_RESAMPLE,
    HF_SIZE,
    HF_STD,
    LABELS,
    TIMM_MEAN,
    TIMM_RESAMPLE,
    TIMM_SHORTEST_EDGE,
    TIMM_SIZE,
    TIMM_STD,
    load_model,
)
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobspec.modelkinds import ModelKind
from orchestrator.jobspec.modelrefs import label_count, normalize_model_ref, read_config
from orchestrator.store.storage import ObjectStore
from workers import models
from workers.decode.imaging import decode_rgb
from workers.decode.preprocess import resize_image
from workers.errors import ModelLoadError, UnsafeCheckpoint


def load(directory, prefix: str = "") -> models.LoadedModel:
    return load_model(normalize_model_ref(prefix + str(directory)), device="cpu")


def test_an_hf_dir_gets_its_preprocessing_from_the_image_processor(hf_model_dir):
    model = load(hf_model_dir)
    assert model.family.model_kind is ModelKind.CLASSIFIER
    assert model.prep.size == (HF_SIZE, HF_SIZE) and model.input_size == (HF_SIZE, HF_SIZE)
    assert model.prep.mean == pytest.approx(HF_MEAN) and model.prep.std == pytest.approx(HF_STD)
    assert model.prep.resample == HF_RESAMPLE
    assert model.prep.shortest_edge is None and model.prep.crop is None  # ViT stretches, no crop


def test_an_hf_dir_gets_its_labels_from_config(hf_model_dir):
    model = load(hf_model_dir, prefix="hf:")
    assert model.id2label == dict(enumerate(LABELS))
    # auto precision on a CPU: bf16 where AMX/AVX512-BF16 make it fast, fp32 on AVX2-only CPUs.
    expected = torch.bfloat16 if models.cpu_has_fast_bf16() else torch.float32
    assert model.device == torch.device("cpu") and model.dtype == expected


def test_compute_names_the_device_and_precision_the_outputs_come_from(hf_model_dir):
    ref = normalize_model_ref(str(hf_model_dir))
    assert load_model(ref, device="cpu", precision="fp32").compute == "cpu fp32"
    assert load_model(ref, device="cpu", precision="bf16").compute == "cpu bf16 autocast"
    auto = "cpu bf16 autocast" if models.cpu_has_fast_bf16() else "cpu fp32"
    assert load_model(ref, device="cpu").compute == auto


def test_a_timm_dir_gets_its_preprocessing_from_timms_data_config(timm_model_dir):
    model = load(timm_model_dir)
    assert model.family.model_kind is ModelKind.TIMM
    assert model.prep.crop == (TIMM_SIZE, TIMM_SIZE) and model.input_size == (TIMM_SIZE, TIMM_SIZE)
    assert model.prep.shortest_edge == TIMM_SHORTEST_EDGE  # from crop_pct 0.875, not timm's default 0.9
    assert model.prep.mean == pytest.approx(TIMM_MEAN) and model.prep.std == pytest.approx(TIMM_STD)
    assert model.prep.resample == TIMM_RESAMPLE


def test_a_timm_dir_gets_its_labels_from_label_names(timm_model_dir):
    model = load(timm_model_dir, prefix="timm:")
    assert model.family.model_kind is ModelKind.TIMM
    assert model.id2label == dict(enumerate(LABELS))


def test_the_fingerprint_is_stable_across_loads(hf_model_dir):
    first, second = load(hf_model_dir), load(hf_model_dir)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("sha256:")


def test_the_fingerprint_changes_when_one_weight_changes(hf_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(hf_model_dir, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert load(changed).fingerprint != load(hf_model_dir).fingerprint


def test_hf_and_timm_models_have_different_fingerprints(hf_model_dir, timm_model_dir):
    assert load(hf_model_dir).fingerprint != load(timm_model_dir).fingerprint


def test_a_dir_with_only_pickle_weights_is_refused(hf_model_dir, tmp_path):
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    shutil.copy(hf_model_dir / "config.json", unsafe)
    shutil.copy(hf_model_dir / "preprocessor_config.json", unsafe)
    torch.save({"w": torch.zeros(1)}, unsafe / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="safetensors"):
        load(unsafe)


def test_a_missing_dir_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load(tmp_path / "no-such-model")


def test_an_unreachable_hub_model_says_to_pass_a_local_dir_or_s3(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, which has happened by now
    # (the model fixtures import it); set both so the lookup fails at once instead of
    # retrying the network for half a minute.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("hf:nonexistent-org/nonexistent-model", device="cpu")
    message = str(info.value)
    assert "hf:nonexistent-org/nonexistent-model" in message
    assert "pass a local directory or s3:// URI" in message


def test_model_info_reads_the_label_count_of_both_families(hf_model_dir, timm_model_dir):
    store = ObjectStore(Settings())
    hf_config = read_config(normalize_model_ref(str(hf_model_dir)), store)
    timm_config = read_config(normalize_model_ref(f"timm:{timm_model_dir}"), store)
    assert hf_config["id2label"]["0"] == "cat" and label_count(hf_config) == len(LABELS)
    assert timm_config["architecture"] == "vit_tiny_patch16_224" and label_count(timm_config) == len(LABELS)


def test_model_info_leaves_hub_names_to_the_worker():
    assert read_config("hf:org/name", ObjectStore(Settings())) is None
    assert label_count({"architecture": "x"}) is None


def test_model_info_refuses_a_dir_without_config(tmp_path):
    with pytest.raises(SpecError, match="config.json"):
        read_config(normalize_model_ref(str(tmp_path)), ObjectStore(Settings()))


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 255 / (width + height - 2)], -1)


def noise(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3))


@pytest.mark.parametrize("image", [gradient(96, 64), gradient(33, 47), noise(96, 64)],
                         ids=["gradient-downscaled", "gradient-upscaled", "noise-downscaled"])
def test_vitbatch_preprocessing_matches_the_hf_image_processor(hf_model_dir, image):
    from transformers import AutoImageProcessor

    data = png(image)
    processor = AutoImageProcessor.from_pretrained(hf_model_dir)
    expected = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]

    prep = load(hf_model_dir).prep
    pixels = resize_image(decode_rgb(data), prep)
    scaled = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    ours = (scaled - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)

    # transformers 5 resizes with torchvision, whose antialiased uint8 resize is built to
    # match PIL's; they differ only in rounding. Measured max differences, in uint8 levels
    # at the smallest std (1 level = 1/255/0.2 = 0.0196): gradient downscaled 0.00001,
    # gradient upscaled 0.67, noise downscaled 1.0. The bound is 1.5 levels. Measured
    # misses: bilinear instead of bicubic on the noise is 20 levels; a wrong mean or std is
    # 25; a wrong size or channel order more still. (Upscaled noise is left out: bicubic
    # overshoot rounds differently, up to 9 levels, even with the right filter.)
    one_level = 1 / 255 / min(prep.std)
    assert ours.shape == expected.shape == (3, HF_SIZE, HF_SIZE)
    assert (ours - expected).abs().max().item() < 1.5 * one_level
