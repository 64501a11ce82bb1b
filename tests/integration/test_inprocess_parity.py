"""A job run in one process (workers/inprocess.py) writes what the same job run through the queue
writes: `_job.json` in its folder and at the prefix, the same plan, and a record with the same
counts and parts. Both go through the one lifecycle (workers/lifecycle.py), over the Redis ledger
with real workers, and over the in-memory ledger here."""

from __future__ import annotations

import json

import pytest
from helpers_curation import write_set

from orchestrator.constants import JOB_SPEC_FILE, SUCCESS_FILE
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.store.storage import ObjectStore, join
from workers.context import WorkerContext
from workers.inprocess import run_local, run_vectors_local

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(tmp_path_factory, bucket, upload, tiny_model, workers) -> dict[str, str]:
    local = tmp_path_factory.mktemp("parity-images")
    write_set(local, every=6)
    upload(local, bucket, "inputs/parity-images")
    upload(tiny_model, bucket, "models/parity-tiny-vit")
    workers.start("wp1")
    return {"input": f"s3://{bucket}/inputs/parity-images/", "model": f"s3://{bucket}/models/parity-tiny-vit/"}


def read(store: ObjectStore, uri: str) -> dict:
    return json.loads(store.read(uri))


def job_files(output: str, store: ObjectStore) -> tuple[dict, dict, dict]:
    """The record at the prefix, and `_job.json` in the job's folder and at the prefix."""
    record = read(store, join(output, SUCCESS_FILE))
    return record, read(store, join(output, record["job_dir"], JOB_SPEC_FILE)), read(store, join(output, JOB_SPEC_FILE))


def same_job(queued: str, local: str, store: ObjectStore) -> tuple[dict, dict]:
    """Assert that the two outputs hold the same job; their records."""
    record_q, folder_q, prefix_q = job_files(queued, store)
    record_l, folder_l, prefix_l = job_files(local, store)
    assert folder_l == prefix_l and folder_l["job_id"] == record_l["job_id"]
    assert folder_q == prefix_q and folder_q["job_id"] == record_q["job_id"]
    assert folder_l["plan"] == folder_q["plan"] and folder_l.get("model_identity") == folder_q.get("model_identity")
    counts = ("kind", "items", "processed", "carried_over", "errors", "shards", "failed_shards")
    assert {c: record_l[c] for c in counts} == {c: record_q[c] for c in counts}
    assert [(p["shard"], p["rows"]) for p in record_l["parts"]] == [(p["shard"], p["rows"]) for p in record_q["parts"]]
    return record_q, record_l


def test_an_embed_and_a_dedup_job_in_process_write_what_the_queue_writes(images, bucket, cli, settings):
    store = ObjectStore(settings)
    out = f"s3://{bucket}/out/parity"
    embed = ["--input", images["input"], "--model", images["model"], "--shard-size", "60", "--batch-size", "16"]
    assert cli(["run", "embed", "--output", f"{out}/emb-q/", *embed]).returncode == 0
    spec = parse_spec({"kind": "embed", "input": images["input"], "output": f"{out}/emb-l/", "model": images["model"],
                       "shard_size": 60, "batch_size": 16})
    run_local(spec, WorkerContext(settings))
    same_job(f"{out}/emb-q/", f"{out}/emb-l/", store)

    done = cli(["run", "dedup", "--embeddings", f"{out}/emb-q/", "--output", f"{out}/dedup-q/",
                "--vectors-per-task", "80"])
    assert done.returncode == 0, done.stderr
    dedup = parse_spec({"kind": "dedup", "embeddings": f"{out}/emb-q/", "output": f"{out}/dedup-l/",
                        "vectors_per_task": 80})
    run_vectors_local(dedup, store)
    record_q, record_l = same_job(f"{out}/dedup-q/", f"{out}/dedup-l/", store)
    assert record_l["dedup"]["kept"] == record_q["dedup"]["kept"] and record_l["dedup"]["removed"] > 0
