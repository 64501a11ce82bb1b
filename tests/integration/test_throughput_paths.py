"""The throughput paths in real worker processes over the S3-compatible server: two shards
in flight on one model (Celery's threads pool), decoding in processes into shared memory,
or on the model's device (torchvision's decoder on this CPU; nvJPEG on a GPU)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from orchestrator.stack.demo import write_digits

pytestmark = pytest.mark.integration
PREFIX = "inputs/mixed"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, s3, bucket, upload) -> str:
    """Digits as PNGs and as baseline JPEGs, plus files no decoder can read."""
    local = tmp_path_factory.mktemp("mixed")
    write_digits(local, limit=40)
    for path in list(local.rglob("*.png"))[::2]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((96, 96)).save(buf, "JPEG", quality=90)
        path.with_suffix(".jpg").write_bytes(buf.getvalue())
        path.unlink()
    upload(local, bucket, PREFIX)
    whole = next(local.rglob("*.jpg")).read_bytes()
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/bad/truncated.jpg", Body=whole[: len(whole) // 2])
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/bad/page.jpg", Body=b"<html>not an image</html>")
    return f"s3://{bucket}/{PREFIX}/"


def _classify(client, model, input_uri: str, output: str, decode: str) -> list[dict]:
    spec = parse_spec({"kind": "classify", "input": input_uri, "output": output, "model": str(model),
                       "shard_size": 8, "batch_size": 4, "decode": decode, "lane": "bulk"})
    job_id, _ = client.submit(spec)
    status = client.wait(job_id, timeout_s=300)
    assert status.state.value == "succeeded", status  # bad files are error rows, not failures
    rows = sorted(read_table(output, client.store).to_pylist(), key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return rows


def test_two_shards_in_flight_with_process_or_device_decode_give_the_rows_of_a_one_shard_worker(
        workers, client, mixed, tiny_model, bucket):
    workers.start("pair", pool="auto", shards_in_flight=2)
    stats = client.app.control.inspect(timeout=5).stats() or {}
    [pair] = [s for name, s in stats.items() if name.startswith("pair@")]
    assert pair["pool"]["max-concurrency"] == 2
    processes = _classify(client, tiny_model, mixed, f"s3://{bucket}/out/pair-processes/", "processes")
    device = _classify(client, tiny_model, mixed, f"s3://{bucket}/out/pair-device/", "device")
    workers.stop("pair")

    workers.start("single")  # solo pool, decoding in threads: the reference
    reference = _classify(client, tiny_model, mixed, f"s3://{bucket}/out/single-threads/", "threads")
    workers.stop("single")

    assert processes == reference  # bit for bit: same decode code, other processes
    errors = {r["key"]: r["error"] for r in reference if r["error"]}
    assert set(errors) == {"bad/truncated.jpg", "bad/page.jpg"}
    assert "truncated" in errors["bad/truncated.jpg"] and "HTML" in errors["bad/page.jpg"]
    assert [(r["key"], r["error"]) for r in device] == [(r["key"], r["error"]) for r in reference]
    for ours, theirs in zip(device, reference):
        if ours["error"] is None:
            assert abs(ours["score"] - theirs["score"]) < 0.02, ours["key"]
