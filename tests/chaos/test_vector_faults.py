"""A worker dies mid-block of an approximate neighbors job, or mid-cluster-group of a dedup job: the
task is run again, the index (k-means) is not built again, and every key has one output row."""

from __future__ import annotations

import secrets
import time

import pytest
from chaos_stack import assert_exactly_once, explain, via
from faulty_s3 import FaultyS3
from helpers_curation import clustered_vectors, write_vectors

from orchestrator.constants import commit_name
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.results import read_table, success_record
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos
K = 5


@pytest.fixture
def vectors(stack, s3) -> tuple[str, list[str]]:
    """Two embed outputs in S3, written without a model: 2,000 indexed vectors in 4 parts, 400
    queries in 20 parts (so a block of 200 queries reads 10 parts, slowly, behind the proxy)."""
    bucket = stack.output.split("/")[2]  # the chaos tests' bucket
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    base = f"s3://{bucket}/vectors-{secrets.token_hex(3)}"
    data = clustered_vectors(2_400, 32, seed=5)
    write_vectors(f"{base}/emb/", data[:2_000], 500, "i", store=stack.store)
    return base, write_vectors(f"{base}/queries/", data[2_000:], 20, "q", store=stack.store)


def test_a_sigkilled_worker_mid_search_block_is_replaced_and_the_index_is_built_once(stack, s3_endpoint, vectors):
    base, keys = vectors
    with FaultyS3(s3_endpoint, delay_s=0.1) as slow:  # a block's 22 reads last seconds, however idle the CPU
        stack.workers.start("doomed", env=via(slow))
        spec = parse_spec({"kind": "neighbors", "embeddings": f"{base}/emb/", "queries": f"{base}/queries/",
                           "output": stack.output, "k": K, "mode": "approximate", "queries_per_task": 200})
        job_id, _ = stack.client.submit(spec)
        stack.submitted.append(job_id)
        index_marker = join(stack.folder(job_id), commit_name(0))
        deadline = time.monotonic() + 120
        while not stack.store.exists(index_marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        shard = stack.running_shard(job_id)  # a search block: the index shard has committed
        stack.workers.kill("doomed")
        stack.workers.start("successor", env=via(slow), wait=False)
        status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert shard >= 1 and stack.attempts(job_id)[shard] >= 2, "the killed block was delivered again"
    assert stack.attempts(job_id)[0] == 1, "the index was built once, by the index shard"
    assert status.requeued >= 1, "the silent block was re-enqueued by the reconciler"
    assert_exactly_once(stack.output, keys, stack.store, row_ok=lambda row: len(row["neighbors"]) == K)
    record = success_record(stack.output, stack.store)
    index = sorted(p.name.rsplit(".", 1)[1] for p in record.parts if "/index/" in p.name)
    assert index == ["arrow", "faiss"], "one index and its keys, those the index shard's marker names"
    assert record.figures["mode"] == "approximate" and record.figures["recall_sample"] == 256


def test_a_sigkilled_worker_mid_cluster_group_of_dedup_is_replaced_and_each_row_is_written_once(
        stack, s3_endpoint, vectors):
    """SIGKILL while a pairs task reads its clusters' vectors (slowly, behind the proxy); the group is
    delivered again, k-means is not fitted again, and every indexed key has one dedup row."""
    base, _ = vectors
    keys = [f"i-{i:07d}.jpg" for i in range(2_000)]  # write_vectors' keys for the indexed set
    with FaultyS3(s3_endpoint, delay_s=0.1) as slow:
        stack.workers.start("doomed", env=via(slow))
        spec = parse_spec({"kind": "dedup", "embeddings": f"{base}/emb/", "output": stack.output,
                           "clusters": 8, "vectors_per_task": 500})
        job_id, _ = stack.client.submit(spec)
        stack.submitted.append(job_id)
        fit_and_assign = range(1 + 4)  # fit, then one assign shard per embed part
        deadline, shard = time.monotonic() + 120, None
        while shard is None:  # a pairs task that has started: its reads of the assigned vectors take seconds
            assert time.monotonic() < deadline, f"no pairs task seen running: {stack.client.ledger.status(job_id)}"
            states = stack.client.ledger.shard_states(job_id)
            shard = next((s for s, state in sorted(states.items()) if s not in fit_and_assign
                          and state is ShardState.RUNNING
                          and not stack.store.exists(join(stack.folder(job_id), commit_name(s)))), None)
            time.sleep(0.02)
        stack.workers.kill("doomed")
        stack.workers.start("successor", env=via(slow), wait=False)
        status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert stack.attempts(job_id)[shard] >= 2, "the killed cluster group was delivered again"
    assert stack.attempts(job_id)[0] == 1, "k-means was fitted once, by the fit shard"
    rows = read_table(stack.output, stack.store).to_pylist()  # the parts the record lists, sha256 checked
    assert sorted(row["key"] for row in rows) == keys, "every indexed key has exactly one dedup row"
    assert all(row["kept"] in (True, False) for row in rows)
    record = success_record(stack.output, stack.store)
    assert record.figures["removed"] == sum(not row["kept"] for row in rows), record.figures
    assert record.figures["kept"] + record.figures["removed"] == len(keys)
