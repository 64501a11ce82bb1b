"""ShardPipeline + ClassifyHead in-process over a tmp folder of small images, on the CPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import LABELS, load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers import models
from workers.decode.imaging import decode_rgb
from workers.decode.preprocess import Decoder, resize_image
from workers.errors import ModelLoadError
from workers.heads import ClassifyHead
from workers.pipeline import DecodePath
from workers.runner import run_with
from workers.stagetimes import StageTimes

TOP_K = 3
BAD = {"g04-empty.jpg": b"", "g09-random.jpg": np.random.default_rng(1).bytes(500)}


def good_images(count: int) -> dict[str, bytes]:
    """Varied sizes, modes and formats, so images get distinguishable logits."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        width, height = 24 + 7 * i, 60 - 3 * i
        y, x = np.mgrid[0:height, 0:width]
        base = rng.integers(0, 256, 3)
        rgb = (base + np.stack([x * (i + 1), y * (12 - i), (x + y) * 2], -1)) % 256
        img = Image.fromarray(rgb.astype(np.uint8))
        buf = io.BytesIO()
        if i % 3 == 0:
            img.save(buf, "JPEG", quality=90)
            name = f"g{i:02d}.jpg"
        elif i % 3 == 1:
            img.convert("L").save(buf, "PNG")
            name = f"g{i:02d}.png"
        else:
            img.convert("RGBA").save(buf, "PNG")
            name = f"g{i:02d}.png"
        out[name] = buf.getvalue()
    return out


def write_folder(root: Path, files: dict[str, bytes]) -> list[Item]:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return plan(normalize_uri(str(root)), 1000, ObjectStore(Settings())).items


@pytest.fixture(scope="module")
def hf_model(hf_model_dir) -> models.LoadedModel:
    """fp32, not `auto`: its labels are compared with a plain fp32 forward pass, and bf16 (auto on
    AMX / AVX512-BF16 CPUs) moves these near-uniform scores by more than their top-2 margins."""
    return load_model(normalize_model_ref(str(hf_model_dir)), device="cpu", precision="fp32")


@pytest.fixture
def items(tmp_path) -> list[Item]:
    return write_folder(tmp_path / "imgs", {**good_images(12), **BAD})


def run(model, items, *, batch_size=5, max_bytes=1 << 20, on_progress=None, top_k=TOP_K):
    head = ClassifyHead(model, 0, top_k)
    times = StageTimes()
    run_with(model, ObjectStore(Settings()), items, head, DecodePath(Decoder(model.prep, 1_000_000)), times,
             batch_size=batch_size, read_concurrency=4, max_bytes=max_bytes, on_progress=on_progress)
    return head.ordered_rows(), times


def reference_label_ids(model: models.LoadedModel, module: torch.nn.Module, items: list[Item]) -> list[int]:
    """argmax of a plain fp32 forward pass over the same preprocessing, one batch."""
    store, prep = ObjectStore(Settings()), model.prep
    arrays = [resize_image(decode_rgb(store.read(item.uri)), prep) for item in items]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        output = model.family.logits(pixels)
    return output.argmax(dim=-1).tolist()


def test_rows_come_back_in_manifest_order_one_per_item(hf_model, items):
    rows, times = run(hf_model, items)
    assert [row["key"] for row in rows] == [item.key for item in items]
    assert [row["etag"] for row in rows] == [item.etag for item in items]
    assert len(items) == 14 and times.items == 14


def test_bad_files_become_error_rows_with_no_label(hf_model, items):
    rows, _ = run(hf_model, items)
    errors = {row["key"]: row for row in rows if row["error"] is not None}
    assert set(errors) == set(BAD)
    assert "empty" in errors["g04-empty.jpg"]["error"]
    for row in errors.values():
        assert row["error"].strip()
        assert row["label"] is None and row["label_id"] is None and row["topk_scores"] is None


def test_good_rows_hold_top_k_labels_with_descending_scores(hf_model, items):
    rows, _ = run(hf_model, items)
    good = [row for row in rows if row["error"] is None]
    assert len(good) == 12
    for row in good:
        assert len(row["topk_labels"]) == len(row["topk_ids"]) == len(row["topk_scores"]) == TOP_K
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert 0 < sum(row["topk_scores"]) <= 1 + 1e-6
        assert row["label"] == row["topk_labels"][0] == LABELS[row["label_id"]]
        assert row["score"] == row["topk_scores"][0]
        assert row["topk_labels"] == [LABELS[i] for i in row["topk_ids"]]


def test_labels_match_a_direct_fp32_forward_pass_of_the_hf_model(hf_model, hf_model_dir, items):
    from transformers import ViTForImageClassification

    module = ViTForImageClassification.from_pretrained(hf_model_dir).eval()
    rows, _ = run(hf_model, items)
    good = [item for item in items if item.key not in BAD]
    got = [row["label_id"] for row in rows if row["error"] is None]
    assert got == reference_label_ids(hf_model, module, good)
    assert len(set(got)) > 1  # the images really are told apart, not all one class


def test_labels_match_a_direct_forward_pass_of_the_timm_model(timm_model_dir, items):
    import timm

    model = load_model(normalize_model_ref(f"timm:{timm_model_dir}"), device="cpu", precision="fp32")
    module = timm.create_model(f"local-dir:{timm_model_dir}", pretrained=True).eval()
    rows, _ = run(model, items)
    good = [item for item in items if item.key not in BAD]
    assert [row["label_id"] for row in rows if row["error"] is None] == reference_label_ids(model, module, good)
    assert {row["label"] for row in rows if row["error"] is None} <= set(LABELS)


def test_batch_size_does_not_change_the_rows(hf_model, items):
    rows_by_5, _ = run(hf_model, items, batch_size=5)
    rows_by_64, _ = run(hf_model, items, batch_size=64)
    assert [r["label_id"] for r in rows_by_5] == [r["label_id"] for r in rows_by_64]
    assert [r["error"] for r in rows_by_5] == [r["error"] for r in rows_by_64]
    for a, b in zip(rows_by_5, rows_by_64):
        if a["error"] is None:
            assert np.allclose(a["topk_scores"], b["topk_scores"], atol=1e-5)


def test_progress_is_monotonic_and_ends_at_the_total(hf_model, items):
    calls = []
    run(hf_model, items, batch_size=5, on_progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(items), len(items))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert all(total == len(items) for _, total in calls)


def test_progress_reaches_the_total_when_the_shard_ends_with_bad_files(hf_model, tmp_path):
    # 10 good images fill two batches of 5 exactly; the two bad files come after them.
    files = {**good_images(10), "z1.jpg": b"", "z2.png": b"not a png"}
    items = write_folder(tmp_path / "imgs", files)
    calls = []
    run(hf_model, items, batch_size=5, on_progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (12, 12)


def test_progress_is_reported_when_every_item_is_bad(hf_model, tmp_path):
    items = write_folder(tmp_path / "imgs", {"a.jpg": b"", "b.jpg": b"junk"})
    calls = []
    rows, _ = run(hf_model, items, on_progress=lambda done, total: calls.append((done, total)))
    assert [row["error"] is not None for row in rows] == [True, True]
    assert calls[-1] == (2, 2)


def test_objects_over_the_byte_cap_become_error_rows(hf_model, items):
    rows, _ = run(hf_model, items, max_bytes=200)
    big = {item.key for item in items if item.size > 200}
    assert big and {row["key"] for row in rows if "over the cap" in (row["error"] or "")} == big


def test_an_object_deleted_after_planning_becomes_an_error_row(hf_model, items):
    from urllib.parse import unquote, urlparse

    Path(unquote(urlparse(items[0].uri).path)).unlink()
    rows, _ = run(hf_model, items)
    assert "does not exist" in rows[0]["error"] and rows[0]["label"] is None
    assert rows[1]["key"] == items[1].key


def test_asking_for_more_labels_than_the_model_has_is_refused(hf_model):
    with pytest.raises(ModelLoadError, match="top_k"):
        ClassifyHead(hf_model, 0, len(LABELS) + 1)
