"""The s3:// model cache against the S3-compatible server: one download per model per cache folder,
never a half-written model, a replaced model downloaded again, nothing written outside the cache."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest

from orchestrator.store.storage import ObjectStore
from workers.errors import ModelLoadError
from workers.modelfiles import download_model

pytestmark = pytest.mark.integration


class CountingStore(ObjectStore):
    """The real store, counting object reads (to see how many downloads happened)."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.reads = 0
        self._lock = threading.Lock()

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        with self._lock:
            self.reads += 1
        return super().read(uri, max_bytes)


def upload_model(s3, bucket: str, model: Path, prefix: str) -> str:
    for path in sorted(model.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}{path.relative_to(model).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def test_four_workers_sharing_a_cache_download_the_model_once(s3, bucket, settings, tiny_model, tmp_path):
    uri = upload_model(s3, bucket, tiny_model, f"models/{secrets.token_hex(4)}/")
    n_files = sum(1 for p in tiny_model.rglob("*") if p.is_file())
    store, cache, got = CountingStore(settings), tmp_path / "cache", []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        got.append(download_model(uri, store, cache))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(set(got)) == 1
    assert store.reads == n_files, "the model was downloaded more than once"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [got[0].name]  # no staging left
    assert (got[0] / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_a_model_replaced_at_the_same_uri_is_downloaded_again(s3, bucket, settings, tiny_model, tmp_path):
    from support import build_tiny_vit

    prefix = f"models/{secrets.token_hex(4)}/"
    uri = upload_model(s3, bucket, tiny_model, prefix)
    store, cache = ObjectStore(settings), tmp_path / "cache"
    first = download_model(uri, store, cache)
    other = build_tiny_vit(tmp_path / "other", num_labels=10, image_size=32, seed=7)
    upload_model(s3, bucket, other, prefix)
    second = download_model(uri, store, cache)

    assert second != first
    assert (second / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()


def test_a_finetune_outputs_checkpoints_are_not_downloaded_with_its_model(s3, bucket, settings, tiny_model, tmp_path):
    prefix = f"models/{secrets.token_hex(4)}/"
    uri = upload_model(s3, bucket, tiny_model, prefix)
    s3.put_object(Bucket=bucket, Key=f"{prefix}checkpoints/step-00000010/optimizer.pt", Body=b"x" * 1000)
    s3.put_object(Bucket=bucket, Key=f"{prefix}_commits/part-00000.json", Body=b"{}")
    local = download_model(uri, ObjectStore(settings), tmp_path / "cache")
    assert not (local / "checkpoints").exists() and not (local / "_commits").exists()
    assert (local / "config.json").is_file()


@pytest.mark.parametrize("hostile", ["/tmp/vitbatch-escape-{}", "../escape-{}", "a/../../escape-{}"])
def test_a_model_key_that_would_land_outside_the_cache_is_refused(s3, bucket, settings, tiny_model, tmp_path, hostile):
    prefix = f"models/{secrets.token_hex(4)}/"
    uri = upload_model(s3, bucket, tiny_model, prefix)
    name = hostile.format(secrets.token_hex(4))
    s3.put_object(Bucket=bucket, Key=prefix + name, Body=b"poison")
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="outside the model cache"):
        download_model(uri, ObjectStore(settings), cache)
    escaped = [p for p in [Path("/tmp") / Path(name).name, tmp_path / Path(name).name, cache.parent / Path(name).name]
               if p.exists()]
    assert escaped == []
    assert [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == b"poison"] == []
