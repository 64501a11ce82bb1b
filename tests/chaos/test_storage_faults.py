"""S3 answers 500, 503 SlowDown, resets connections and cuts bodies short; no row is lost or doubled."""

from __future__ import annotations

import pytest
from chaos_stack import assert_exactly_once, explain, via
from faulty_s3 import FAULTS, FaultyS3

from orchestrator.lifecycle.states import JobState
from orchestrator.published.results import read_table

pytestmark = pytest.mark.chaos


def test_transient_s3_faults_are_retried_without_failing_a_shard_or_an_image(stack, s3_endpoint, digits):
    with FaultyS3(s3_endpoint, fail_every=4) as flaky:  # every 4th object read fails, each fault in turn
        stack.workers.start("w", env=via(flaky))
        job_id = stack.submit(digits.s3_prefix, read_concurrency=4, shard_size=50)
        status = stack.wait(job_id)

    assert set(flaky.injected) == set(FAULTS) and min(flaky.injected.values()) >= 5, flaky.injected
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert set(stack.attempts(job_id).values()) == {1}, "every shard committed on its first delivery"
    errors = [e for e in read_table(stack.output, stack.store).column("error").to_pylist() if e]
    assert errors == [], f"transient faults became error rows: {errors[:3]}"
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_objects_no_retry_can_read_are_error_rows_and_the_shard_commits_first_time(stack, s3_endpoint, digits):
    bucket_path = digits.s3_prefix[len("s3://"):]  # "bucket/digits/", as the proxy sees object paths
    denied, archived, kms = sorted(digits.keys)[:3]
    faults = {bucket_path + denied: "403", bucket_path + archived: "archived", bucket_path + kms: "kms"}
    with FaultyS3(s3_endpoint, key_faults=faults) as proxy:
        stack.workers.start("w", env=via(proxy))
        job_id = stack.submit(digits.s3_prefix, shard_size=50)
        status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert set(stack.attempts(job_id).values()) == {1}, "no shard was retried for an object no retry can read"
    errors = {row["key"]: row["error"] for row in read_table(stack.output, stack.store).to_pylist() if row["error"]}
    assert set(errors) == {denied, archived, kms}, errors
    assert "access denied" in errors[denied]
    assert "archived" in errors[archived] and "InvalidObjectState" in errors[archived]
    assert "KMS" in errors[kms]
    assert all(proxy.reads[path] == 1 for path in faults), {p: proxy.reads[p] for p in faults}
    assert_exactly_once(stack.output, digits.keys, stack.store)
