"""The Delta table at an output prefix is part of the fenced publication: a worker SIGKILLed
mid-job, a finalize delivered again and an --overwrite rerun each leave exactly one commit per
published job, and the table reads the rows `read_table` reads."""

from __future__ import annotations

import json

import pytest
from chaos_stack import assert_exactly_once, explain, via
from deltalake import DeltaTable

from orchestrator.lifecycle.finalize import finalize
from orchestrator.lifecycle.states import JobState
from orchestrator.published.delta import job_versions, storage_options, table_uri
from orchestrator.published.results import read_table
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos


def log_commits(stack) -> list[dict]:
    """Each commit file of the table's log: its commitInfo and how many files it added and removed."""
    commits = []
    for info in stack.store.list(join(stack.output, "_delta_log")):
        if not info.uri.endswith(".json"):
            continue
        actions = [json.loads(line) for line in stack.store.read(info.uri).decode().splitlines() if line]
        commit = next(a["commitInfo"] for a in actions if "commitInfo" in a)
        commits.append({"job": commit.get("vitbatch.job_id"), "adds": sum("add" in a for a in actions),
                        "removes": sum("remove" in a for a in actions),
                        "txn": [a["txn"]["appId"] for a in actions if "txn" in a]})
    return commits


def table(stack, version: int | None = None) -> DeltaTable:
    return DeltaTable(table_uri(stack.output), version=version,
                      storage_options=storage_options(stack.settings, stack.output))


def test_a_sigkilled_worker_leaves_one_commit_per_publication_and_a_redelivered_finalize_adds_none(
        stack, slow_s3, digits):
    stack.workers.start("doomed", env=via(slow_s3))
    first = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(first)
    stack.workers.kill("doomed")
    stack.workers.start("successor", env=via(slow_s3), wait=False)
    status = stack.wait(first)
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.requeued >= 1, "the killed worker's shard was delivered again"
    assert_exactly_once(stack.output, digits.keys, stack.store)
    assert finalize(first, stack.client.ledger, stack.store) is JobState.SUCCEEDED  # a late finalize: no commit

    commits = log_commits(stack)
    assert [(c["job"], c["txn"]) for c in commits] == [(first, [f"vitbatch:{first}"])]
    assert commits[0]["adds"] == status.n_shards
    expected = sorted(read_table(stack.output, stack.store).column("key").to_pylist())
    assert sorted(table(stack).to_pyarrow_table().column("key").to_pylist()) == expected


def test_an_overwrite_rerun_is_one_commit_that_replaces_the_rows_and_keeps_the_previous_version(stack, digits):
    stack.workers.start("w")
    first = stack.submit(digits.s3_prefix + "1/")
    assert stack.wait(first).state is JobState.SUCCEEDED
    first_keys = sorted(read_table(stack.output, stack.store).column("key").to_pylist())
    second, _ = stack.client.submit(stack.spec(digits.s3_prefix + "2/"), overwrite=True)
    assert stack.wait(second).state is JobState.SUCCEEDED
    finalize(second, stack.client.ledger, stack.store)

    commits = log_commits(stack)
    assert [c["job"] for c in commits] == [first, second]
    assert commits[1]["removes"] == commits[0]["adds"] and commits[1]["adds"] >= 1, commits
    now = sorted(table(stack).to_pyarrow_table().column("key").to_pylist())
    assert now == sorted(read_table(stack.output, stack.store).column("key").to_pylist())
    assert not set(now) & set(first_keys), "no row of the overwritten run is left"
    assert sorted(table(stack, 0).to_pyarrow_table().column("key").to_pylist()) == first_keys
    assert [job for _, job in job_versions(stack.output, stack.store)] == [second, first]
