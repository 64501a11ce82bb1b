"""The three decode paths (threads, processes into shared memory, the model's device) give
the same rows; what the device cannot decode exactly goes to the CPU."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import load_model
from PIL import Image
from sklearn.datasets import load_sample_images

from orchestrator.config import Settings
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers import models
from workers.decode.device import decode_batch, device_decodable, resize_batch
from workers.decode.imaging import decode_rgb
from workers.decode.pool import DecodePool
from workers.decode.preprocess import Decoder, Preprocess, resize_image
from workers.heads import ClassifyHead
from workers.pipeline import DecodePath, read_ahead
from workers.runner import run_with
from workers.stagetimes import StageTimes

MAX_PIXELS = 10_000_000


def jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos (scikit-learn ships two), cut to a few sizes and aspect ratios."""
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    return [china.resize((500, 375)), flower.crop((0, 0, 300, 420)), china.crop((100, 50, 260, 150)),
            flower.resize((64, 48)), china.convert("L").resize((240, 240))]


@pytest.fixture(scope="module")
def model(hf_model_dir) -> models.LoadedModel:
    return load_model(normalize_model_ref(str(hf_model_dir)), device="cpu")


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(2)
    yield pool
    pool.close()


@pytest.fixture
def items(tmp_path, photos) -> list[Item]:
    files = {f"p{i:02d}.jpg": jpeg(p) for i, p in enumerate(photos)}
    files.update({f"q{i:02d}.png": _png(p) for i, p in enumerate(photos)})
    files.update({"bad-empty.jpg": b"", "bad-truncated.jpg": jpeg(photos[0])[:3000], "bad-text.png": b"hello"})
    root = tmp_path / "imgs"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return plan(normalize_uri(str(root)), 1000, ObjectStore(Settings())).items


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def run(model, items, *, block=None, device_jpegs=False, batch_size=2, read_concurrency=1):
    path = DecodePath(Decoder(model.prep, MAX_PIXELS), block, device_jpegs)
    head = ClassifyHead(model, 0, 3)
    times = StageTimes()
    run_with(model, ObjectStore(Settings()), items, head, path, times, batch_size=batch_size,
             read_concurrency=read_concurrency, max_bytes=1 << 24)
    return head.ordered_rows(), times


def slots_for(pool, model, batch_size=2, read_concurrency=1):
    slots = read_ahead(read_concurrency, batch_size) + batch_size
    return pool.slot_block(slots, (*model.input_size, 3), Decoder(model.prep, MAX_PIXELS))


def test_process_decode_gives_exactly_the_rows_of_thread_decode(model, items, pool):
    threads, _ = run(model, items)
    with slots_for(pool, model) as block:
        processes, times = run(model, items, block=block)
    assert processes == threads  # same labels, scores and error reasons, bit for bit
    assert sum(row["error"] is not None for row in processes) == 3
    assert times.decode_s > 0


def test_a_shard_longer_than_the_lane_reuses_its_slots_and_frees_them_all(model, items, pool):
    with slots_for(pool, model) as block:
        assert block.shape[0] < len(items)
        rows, _ = run(model, items, block=block)
        assert block._free.qsize() == block.shape[0]
    assert [row["key"] for row in rows] == [item.key for item in items]


def test_the_shared_memory_block_is_removed_when_the_lane_closes(model, pool):
    with slots_for(pool, model) as block:
        path = Path("/dev/shm") / block._shm.name
        assert path.exists()
    assert not path.exists()


def test_a_killed_decode_process_is_replaced_and_the_image_still_decodes(model, photos, pool):
    decoder = Decoder(model.prep, MAX_PIXELS)
    with slots_for(pool, model) as block:
        assert block.decode(jpeg(photos[0]))[1] is None  # the pool is up
        for pid in list(pool._current()._processes):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        slot, error, _ = block.decode(jpeg(photos[1]))
        assert error is None
        assert np.array_equal(block.pixels[slot], decoder.decode(jpeg(photos[1])))


def test_a_decode_past_its_time_limit_is_an_error_and_the_pool_recovers(model, photos, pool, monkeypatch):
    import workers.decode.pool as decodepool

    big = photos[0].resize((3000, 2250))
    with slots_for(pool, model) as block:
        monkeypatch.setattr(decodepool, "DECODE_TIMEOUT_S", 0.005)
        slot, error, _ = block.decode(_png(big))  # a PNG has no reduced-scale decode: slow
        assert slot is None and "longer than" in error
        monkeypatch.setattr(decodepool, "DECODE_TIMEOUT_S", 120.0)
        slot, error, _ = block.decode(jpeg(photos[1]))
        assert error is None
        assert np.array_equal(block.pixels[slot], block.decoder.decode(jpeg(photos[1])))


@pytest.mark.parametrize("prep", [
    dict(size=(224, 224), resample=Image.BILINEAR),  # HF ViT: stretch
    dict(size=(224, 224), resample=Image.BICUBIC, shortest_edge=248, crop=(224, 224)),  # timm: short side, crop
    dict(size=(96, 160), resample=Image.BICUBIC, shortest_edge=106, crop=(96, 160), cover=(106, 177)),  # non-square
    dict(size=(64, 64), resample=Image.BILINEAR, shortest_edge=64, crop=(80, 80)),  # crop past the edges pads
])
def test_device_resize_matches_the_cpu_geometry_within_a_level_or_two(photos, prep):
    prep = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, **prep)
    raws = [jpeg(p) for p in photos]
    on_device = resize_batch(decode_batch(raws, torch.device("cpu")), prep)
    for raw, tensor in zip(raws, on_device):
        cpu = resize_image(decode_rgb(raw), prep).astype(np.float32)  # full-scale decode: geometry only
        ours = tensor.permute(1, 2, 0).numpy()
        assert ours.shape == cpu.shape
        assert np.abs(ours - cpu).mean() < 2.0, "antialiased resize of the same decode"


def test_only_jpegs_the_device_decodes_exactly_are_sent_there(photos):
    photo = photos[0]
    rotated = photo.getexif()
    rotated[0x0112] = 6
    assert device_decodable(jpeg(photo), MAX_PIXELS)
    assert device_decodable(jpeg(photos[4]), MAX_PIXELS)  # grayscale
    assert not device_decodable(jpeg(photo, progressive=True), MAX_PIXELS)
    assert not device_decodable(jpeg(photo.convert("CMYK")), MAX_PIXELS)
    assert not device_decodable(jpeg(photo, exif=rotated), MAX_PIXELS)
    assert not device_decodable(jpeg(photo)[:3000], MAX_PIXELS)  # truncated: no end-of-image marker
    assert not device_decodable(_png(photo), MAX_PIXELS)
    assert not device_decodable(jpeg(photo), max_pixels=1000)


def test_rows_decoded_on_the_device_match_the_cpu_rows_and_bad_files_keep_their_reasons(model, items, pool):
    threads, _ = run(model, items)
    busy = DecodePool(1)
    busy.has_idle_process = lambda: False  # every plain JPEG goes to the device
    with slots_for(busy, model) as block:
        device, times = run(model, items, block=block, device_jpegs=True)
    busy.close()
    assert times.device_decode_s > 0
    assert [row["key"] for row in device] == [row["key"] for row in threads]
    assert [row["error"] for row in device] == [row["error"] for row in threads]
    for ours, theirs in zip(device, threads):
        if ours["error"] is None:
            assert np.allclose(ours["topk_scores"], theirs["topk_scores"], atol=0.02)


def _run_shard(model_dir, items, tmp_path, ctx=None, **options) -> dict:
    from orchestrator.config import Settings
    from orchestrator.inputs.manifest import write_manifests
    from orchestrator.jobspec.jobs import parse_spec
    from workers.context import WorkerContext
    from workers.runner import run_shard

    folder = Path(items[0].uri.removeprefix("file://")).parent
    spec = parse_spec({"kind": "classify", "input": str(folder), "output": str(tmp_path / "out"),
                       "model": str(model_dir), "device": "cpu", **options})
    write_manifests(plan(spec.input, spec.shard_size, ObjectStore(Settings())), spec.output, ObjectStore(Settings()))
    return run_shard(spec, 0, ctx or WorkerContext(Settings()))


def test_an_unset_batch_size_runs_cache_sized_batches_on_a_cpu(hf_model_dir, items, tmp_path):
    marker = _run_shard(hf_model_dir, items, tmp_path)
    assert marker.batch_size == 16 and marker.rows == len(items)


def test_a_shard_decodes_in_threads_when_dev_shm_has_no_room(hf_model_dir, items, tmp_path, caplog):
    from orchestrator.config import Settings
    from workers.context import WorkerContext
    from workers.errors import NoSharedMemory

    class NoRoom(DecodePool):
        def slot_block(self, *args, **kwargs):
            raise NoSharedMemory("/dev/shm has no room (shm_size)")

    ctx = WorkerContext(Settings())
    ctx.decode_pool = NoRoom(1)
    marker = _run_shard(hf_model_dir, items, tmp_path, ctx, decode="processes")
    assert marker.rows == len(items) and marker.errors == 3
    assert "decoding in threads" in caplog.text


def test_a_lane_larger_than_dev_shm_is_refused_clearly_and_leaves_nothing_behind(model, pool):
    from workers.errors import NoSharedMemory

    stat = os.statvfs("/dev/shm")
    slot_bytes = 224 * 224 * 3
    slots = stat.f_blocks * stat.f_frsize // slot_bytes + 16  # more than the whole of /dev/shm
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(NoSharedMemory, match="shm_size"):
        pool.slot_block(slots, (224, 224, 3), Decoder(model.prep, MAX_PIXELS))
    assert set(os.listdir("/dev/shm")) == before
