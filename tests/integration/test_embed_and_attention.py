"""embed and attention end to end: CLI -> Redis -> a real worker process -> S3-compatible server -> npy + parquet."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.constants import SUCCESS_FILE
from orchestrator.published.results import committed_parts, read_arrays, read_embeddings, read_index
from orchestrator.stack.demo import write_digits
from orchestrator.store.storage import join

pytestmark = pytest.mark.integration
N_IMAGES = 24
BAD_KEY = "bad/empty.png"
SHARD_SIZE = 8
N_OVERLAYS = 3
GRID = (8, 8)  # conftest's tiny_model: 32 px inputs, patch 4
HIDDEN, LAYERS = 64, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3, bucket, upload, tiny_model):
    local = tmp_path_factory.mktemp("embed-digits")
    write_digits(local, limit=N_IMAGES)
    upload(local, bucket, "inputs/embed-digits")
    s3.put_object(Bucket=bucket, Key=f"inputs/embed-digits/{BAD_KEY}", Body=b"")
    upload(tiny_model, bucket, "models/embed-tiny-vit")
    return local


@pytest.fixture(scope="module")
def good_keys(dataset) -> list[str]:
    return sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png"))


def submit(cli, bucket: str, kind: str, name: str, *options: str) -> tuple[str, str]:
    out = f"s3://{bucket}/out/{name}/"
    submitted = cli(["submit", kind, "--input", f"s3://{bucket}/inputs/embed-digits/", "--output", out,
                     "--model", f"s3://{bucket}/models/embed-tiny-vit/", "--shard-size", str(SHARD_SIZE),
                     "--batch-size", "4", *options])
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().splitlines()[-1], out


@pytest.fixture(scope="module")
def finished_jobs(dataset, workers, cli, bucket):
    """Both jobs queued at once on one worker, then waited for: {kind: (job_id, output, wait result)}."""
    workers.start("we1", wait=False)
    jobs = {"embed": submit(cli, bucket, "embed", "embed-run1", "--pooling", "cls,mean"),
            "attention": submit(cli, bucket, "attention", "attention-run1", "--max-overlays", str(N_OVERLAYS))}
    workers.wait_ready("we1")
    return {kind: (job_id, out, cli(["wait", job_id])) for kind, (job_id, out) in jobs.items()}


def test_wait_exits_zero_for_both_jobs(finished_jobs):
    for kind, (_, _, waited) in finished_jobs.items():
        assert waited.returncode == 0, (kind, waited.stdout + waited.stderr)
        assert "succeeded" in waited.stdout


def test_every_good_image_has_exactly_one_cls_and_mean_vector(finished_jobs, client, good_keys):
    _, out, _ = finished_jobs["embed"]
    for pooling in ("cls", "mean"):
        keys, vectors = read_embeddings(out, pooling, client.store)
        assert len(keys) == len(set(keys)) == N_IMAGES
        assert sorted(keys) == good_keys
        assert vectors.dtype == np.float16 and vectors.shape == (N_IMAGES, HIDDEN)
        assert np.isfinite(vectors).all()
    arrays = {uri.rsplit("/", 2)[1] for uri in committed_parts(out, client.store, ".npy")}
    assert arrays == {"cls", "mean"}  # patches were not asked for


def test_embeddings_equal_a_direct_fp32_computation(finished_jobs, client, tiny_model, dataset):
    from transformers import AutoImageProcessor, ViTForImageClassification

    _, out, _ = finished_jobs["embed"]
    keys, cls = read_embeddings(out, "cls", client.store)
    _, mean = read_embeddings(out, "mean", client.store)
    module = ViTForImageClassification.from_pretrained(tiny_model).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model)
    images = [Image.open(dataset / key).convert("RGB") for key in keys]
    with torch.no_grad():
        tokens = module.vit(**processor(images, return_tensors="pt")).last_hidden_state
    for stored, want in ((cls, tokens[:, 0]), (mean, tokens[:, 1:].mean(dim=1))):
        got = torch.from_numpy(stored.astype(np.float32))
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.999
    assert len({row.tobytes() for row in cls}) == N_IMAGES  # the rows really differ per image


def test_the_empty_file_is_an_error_row_without_vectors_in_both_jobs(finished_jobs, client, good_keys):
    for kind in ("embed", "attention"):
        _, out, _ = finished_jobs[kind]
        rows = read_index(out, client.store).to_pylist()
        keys = [row["key"] for row in rows]
        assert len(keys) == len(set(keys)) == N_IMAGES + 1
        bad = {row["key"]: row for row in rows}[BAD_KEY]
        assert "0 bytes" in bad["error"] and bad["row"] == -1
        assert all(row["error"] is None and row["row"] >= 0 for row in rows if row["key"] != BAD_KEY)
        keys_with_arrays, _ = read_arrays(out, "cls" if kind == "embed" else "rollout", client.store)
        assert BAD_KEY not in keys_with_arrays and sorted(keys_with_arrays) == good_keys


def test_attention_maps_cover_the_patch_grid_and_sum_to_one(finished_jobs, client, good_keys):
    _, out, _ = finished_jobs["attention"]
    for name in (f"layer{LAYERS - 1}", "rollout"):
        keys, maps = read_arrays(out, name, client.store)
        assert sorted(keys) == good_keys and len(set(keys)) == N_IMAGES
        assert maps.dtype == np.float16 and maps.shape == (N_IMAGES, *GRID)
        assert (maps >= 0).all()
        np.testing.assert_allclose(maps.astype(np.float64).sum(axis=(1, 2)), 1.0, atol=5e-3)


def test_only_the_first_images_of_the_job_get_overlays(finished_jobs, client, s3, bucket):
    job_id, out, _ = finished_jobs["attention"]
    rows = read_index(out, client.store).to_pylist()
    assert [row["overlay"] is not None for row in rows] == [True] * N_OVERLAYS + [False] * (len(rows) - N_OVERLAYS)
    prefix = out.split(f"s3://{bucket}/", 1)[1]
    folder = f"{prefix}_jobs/{job_id}/"
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=folder + "overlays/").get("Contents", [])]
    assert sorted(stored) == sorted(prefix + row["overlay"] for row in rows[:N_OVERLAYS])
    for row in rows[:N_OVERLAYS]:
        overlay = Image.open(io.BytesIO(client.store.read(join(out, row["overlay"]))))
        assert overlay.format == "PNG" and overlay.size == (32, 32)  # the digits are 32x32


def test_both_outputs_hold_a_success_summary(finished_jobs, s3, bucket):
    for kind, (job_id, out, _) in finished_jobs.items():
        prefix = out.split(f"s3://{bucket}/", 1)[1]
        success = json.loads(s3.get_object(Bucket=bucket, Key=prefix + SUCCESS_FILE)["Body"].read())
        assert success["job_id"] == job_id and success["kind"] == kind
        assert success["items"] == success["processed"] == N_IMAGES + 1
        assert success["errors"] == 1
        assert success["shards"] == -(-(N_IMAGES + 1) // SHARD_SIZE)
        assert success["model_fingerprint"].startswith("sha256:")
