"""classify end to end: CLI -> Redis -> real worker processes -> S3-compatible server -> parquet."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator.constants import JOB_SPEC_FILE, SUCCESS_FILE
from orchestrator.published.results import read_table
from orchestrator.stack.demo import write_digits
from orchestrator.stack.processes import ALL_QUEUES
from orchestrator.store.storage import join

pytestmark = pytest.mark.integration
N_IMAGES = 60
BAD_FILES = {
    "bad/empty.jpg": b"",
    "bad/truncated.jpg": None,  # filled in below from a real JPEG cut in half
    "bad/page.png": b"<!DOCTYPE html><html><body>not an image</body></html>",
}


def _bad_files() -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    return {**BAD_FILES, "bad/truncated.jpg": buffer.getvalue()[: len(buffer.getvalue()) // 2]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3, bucket, upload, tiny_model):
    local = tmp_path_factory.mktemp("digits")
    write_digits(local, limit=N_IMAGES)
    upload(local, bucket, "inputs/digits")
    for key, data in _bad_files().items():
        s3.put_object(Bucket=bucket, Key=f"inputs/digits/{key}", Body=data)
    s3.put_object(Bucket=bucket, Key="inputs/digits/README.txt", Body=b"not an image; must be ignored")
    upload(tiny_model, bucket, "models/tiny-vit")
    return local


@pytest.fixture(scope="module")
def finished_job(dataset, workers, cli, client, bucket):
    for name in ("w1", "w2"):
        workers.start(name, wait=False)
    for name in ("w1", "w2"):
        workers.wait_ready(name)
    out = f"s3://{bucket}/out/classify-run1/"
    submitted = cli(["submit", "classify", "--input", f"s3://{bucket}/inputs/digits/", "--output", out,
                     "--model", f"s3://{bucket}/models/tiny-vit/", "--shard-size", "16", "--batch-size", "8",
                     "--top-k", "3"])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    waited = cli(["wait", job_id])
    return job_id, out, waited


def _direct_labels(model_dir, local_dir) -> dict[str, tuple[int, float]]:
    """The same model in fp32, run directly with transformers: key -> (argmax, top-2 margin)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    out = {}
    paths = sorted(local_dir.rglob("*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        probs = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    top2 = probs.topk(2, dim=-1)
    for path, ids, scores in zip(paths, top2.indices.tolist(), top2.values.tolist()):
        out[path.relative_to(local_dir).as_posix()] = (ids[0], scores[0] - scores[1])
    return out


def test_wait_exits_zero_when_the_job_succeeds(finished_job):
    job_id, _, waited = finished_job
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "succeeded" in waited.stdout


def test_every_image_is_one_row_and_non_images_are_ignored(finished_job, client):
    _, out, _ = finished_job
    table = read_table(out, client.store)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == N_IMAGES + len(BAD_FILES)
    assert "README.txt" not in keys


def test_bad_files_become_error_rows_with_reasons(finished_job, client):
    _, out, _ = finished_job
    rows = {r["key"]: r for r in read_table(out, client.store).to_pylist()}
    for key in BAD_FILES:
        assert rows[key]["error"], f"{key} should be an error row"
        assert rows[key]["label"] is None
    assert "0 bytes" in rows["bad/empty.jpg"]["error"]
    assert "HTML" in rows["bad/page.png"]["error"]
    good = [r for k, r in rows.items() if not k.startswith("bad/")]
    assert all(r["error"] is None and len(r["topk_labels"]) == 3 for r in good)


def test_labels_equal_a_direct_fp32_computation(finished_job, client, tiny_model, dataset):
    _, out, _ = finished_job
    rows = {r["key"]: r for r in read_table(out, client.store).to_pylist()}
    direct = _direct_labels(tiny_model, dataset)
    # `auto` is bf16 on AMX / AVX512-BF16 workers, which moves this random model's near-uniform
    # probabilities by up to ~3e-4: a label is decisive only beyond what that rounding can flip.
    computed = json.loads(client.store.read(join(out, SUCCESS_FILE)))["computed_with"]
    min_margin = 1e-4 if set(computed) == {"cpu fp32"} else 2e-3
    decisive = {k: label for k, (label, margin) in direct.items() if margin > min_margin}
    assert len(decisive) >= 0.9 * N_IMAGES  # random weights still separate almost every image
    assert {k: rows[k]["label_id"] for k in decisive} == decisive


def test_outputs_hold_job_spec_manifests_markers_and_success(finished_job, client, s3, bucket):
    job_id, out, _ = finished_job
    prefix = out.split(f"s3://{bucket}/", 1)[1]
    keys = {o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    n_shards = -(-(N_IMAGES + len(BAD_FILES)) // 16)
    folder = f"_jobs/{job_id}/"
    assert {f"{folder}part-{i:05d}.parquet" for i in range(n_shards)} <= keys
    assert {f"{folder}_commits/part-{i:05d}.json" for i in range(n_shards)} <= keys
    assert {f"{folder}_manifests/shard-{i:05d}.jsonl" for i in range(n_shards)} <= keys
    assert all(key.startswith(("_jobs/", "_SUCCESS", "_job.json", "_delta_log/", "_report.html"))
               for key in keys)  # nothing loose at the prefix
    assert "_report.html" in keys and "_delta_log/00000000000000000000.json" in keys, "the table and the page"
    success = json.loads(s3.get_object(Bucket=bucket, Key=prefix + SUCCESS_FILE)["Body"].read())
    assert success["job_id"] == job_id and success["job_dir"] == folder.rstrip("/")
    listed = {part["name"]: part for part in success["parts"]}
    assert set(listed) == {f"{folder}part-{i:05d}.parquet" for i in range(n_shards)}
    for name, part in listed.items():
        data = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert pq.read_table(io.BytesIO(data)).num_rows == part["rows"]
    marker = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}{folder}_commits/part-00000.json")["Body"].read())
    assert marker["job_id"] == job_id and marker["spec_sha256"] == success["spec_sha256"]
    assert success["items"] == success["processed"] == N_IMAGES + len(BAD_FILES)
    assert success["errors"] == len(BAD_FILES)
    assert success["model_fingerprint"].startswith("sha256:")
    # precision auto on these CPU workers: fp32, or bf16 where AMX/AVX512-BF16 make it fast
    assert marker["compute"] in ("cpu fp32", "cpu bf16 autocast")
    assert success["computed_with"] == {marker["compute"]: n_shards}
    assert success["images_per_s"] > 0
    spec = json.loads(s3.get_object(Bucket=bucket, Key=prefix + JOB_SPEC_FILE)["Body"].read())
    assert spec["plan"]["ignored_non_images"] == 1


def test_part_files_are_plain_parquet(finished_job, s3, bucket):
    job_id, out, _ = finished_job
    prefix = out.split(f"s3://{bucket}/", 1)[1]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{prefix}_jobs/{job_id}/part-00000.parquet")["Body"].read()))
    assert {"key", "etag", "label", "label_id", "score", "topk_labels", "topk_scores", "error"} <= set(table.column_names)
    scores = [s for s in table.column("topk_scores").to_pylist() if s]
    assert all(np.all(np.diff(s) <= 1e-6) for s in scores)


def test_status_json_reports_totals(finished_job, cli):
    job_id, _, _ = finished_job
    result = cli(["status", job_id, "--json"])
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded"
    assert status["done"] == N_IMAGES + len(BAD_FILES)
    assert status["errors"] == len(BAD_FILES)


def test_a_model_that_cannot_be_loaded_fails_the_job_once(finished_job, cli, bucket):
    submitted = cli(["submit", "classify", "--input", f"s3://{bucket}/inputs/digits/", "--output",
                     f"s3://{bucket}/out/missing-model/", "--model", "hf:nonexistent-org/nonexistent-vit",
                     "--shard-size", "16"])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    waited = cli(["wait", job_id], timeout_s=120)
    assert waited.returncode != 0
    status = json.loads(cli(["status", job_id, "--json"]).stdout)
    assert status["state"] == "failed"
    assert "nonexistent-org/nonexistent-vit" in status["reason"]
    assert "local directory or s3://" in status["reason"]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch_size"),
    (["--input", "ftp://nowhere/x"], "scheme"),
    (["--top-k", "50"], "top_k=50 is larger than the model's 10 labels"),
])
def test_a_bad_spec_is_refused_before_anything_is_enqueued(args, message, cli, client, bucket, s3, dataset):
    base = {"--input": f"s3://{bucket}/inputs/digits/", "--output": f"s3://{bucket}/out/refused/",
            "--model": f"s3://{bucket}/models/tiny-vit/"}
    overrides = dict(zip(args[::2], args[1::2]))
    argv = ["submit", "classify"]
    for flag, value in {**base, **overrides}.items():
        argv += [flag, value]
    queued_before = sum(client.ledger.r.llen(q) for q in ALL_QUEUES.split(","))
    jobs_before = client.ledger.recent_jobs(1000)
    result = cli(argv)
    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split())
    assert sum(client.ledger.r.llen(q) for q in ALL_QUEUES.split(",")) == queued_before
    assert client.ledger.recent_jobs(1000) == jobs_before
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/refused/")


def test_missing_input_is_refused(cli, bucket, tiny_model):
    result = cli(["submit", "classify", "--input", "/nonexistent/images", "--output",
                  f"s3://{bucket}/out/refused2/", "--model", str(tiny_model)])
    assert result.returncode != 0
    assert "does not exist" in result.stderr
