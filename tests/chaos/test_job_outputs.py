"""Every job's output is its own: reruns, concurrent submits, cancel + retry and a full Redis,
against a real Redis, the S3-compatible server and real worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from chaos_stack import ROOT, assert_exactly_once, explain, via

from orchestrator.constants import JOBS_DIR, SUCCESS_FILE
from orchestrator.errors import OutputBusy, SpecError
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.results import read_table, success_record
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos
TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}


def keys_of(digits, *classes: str) -> set[str]:
    """The keys a job over digits/<class>/ reports (relative to its input prefix)."""
    if len(classes) == 1:
        return {k.split("/", 1)[1] for k in digits.keys if k.split("/", 1)[0] == classes[0]}
    return {k for k in digits.keys if k.split("/", 1)[0] in classes}


def job_folders(stack) -> set[str]:
    listed = stack.store.list(join(stack.output, JOBS_DIR))
    return {info.uri[len(join(stack.output, JOBS_DIR)) + 1:].split("/", 1)[0] for info in listed}


def cli_submit(stack, input_uri: str, *extra: str):
    """`vitbatch submit classify ...` exactly as the README prints it."""
    return stack.cli(["submit", "classify", "--input", input_uri, "--output", stack.output,
                      "--model", str(stack.model), *extra])


def test_a_rerun_with_overwrite_and_other_inputs_holds_exactly_the_new_keys(stack, digits):
    stack.workers.start("w")
    first = cli_submit(stack, digits.s3_prefix + "0/")
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.strip().splitlines()[-1]
    assert stack.wait(first_id).state is JobState.SUCCEEDED

    refused = cli_submit(stack, digits.s3_prefix + "1/")
    assert refused.returncode != 0 and first_id in refused.stdout + refused.stderr and "--overwrite" in refused.stderr

    second = cli_submit(stack, digits.s3_prefix + "1/", "--overwrite")
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.strip().splitlines()[-1]
    status = stack.wait(second_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert_exactly_once(stack.output, keys_of(digits, "1"), stack.store)
    assert success_record(stack.output, stack.store).job_id == second_id
    assert job_folders(stack) == {first_id, second_id}, "the replaced job's folder stays for the table's previous version"


def test_a_shrinking_rerun_leaves_no_rows_of_the_bigger_job(stack, digits):
    stack.workers.start("w")
    big = stack.submit(digits.s3_prefix, shard_size=40)  # 4 shards
    assert stack.wait(big).state is JobState.SUCCEEDED
    small, _ = stack.client.submit(stack.spec(digits.s3_prefix + "2/", shard_size=40), overwrite=True)  # 1 shard
    assert stack.wait(small).state is JobState.SUCCEEDED

    assert_exactly_once(stack.output, keys_of(digits, "2"), stack.store)
    assert len(success_record(stack.output, stack.store).parts) == 1


def test_two_concurrent_submits_to_one_prefix_one_is_refused_the_other_is_exact(stack, digits):
    commands = [[sys.executable, "-m", "orchestrator.commands.cli", "submit", "classify", "--input", digits.s3_prefix + c + "/",
                 "--output", stack.output, "--model", str(stack.model), "--overwrite"] for c in ("3", "4")]
    procs = [subprocess.Popen(c, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for c in commands]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]

    winners = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results
    winner_id = results[winners[0]][1].strip().splitlines()[-1]
    loser_err = results[1 - winners[0]][2]
    assert f"held by job {winner_id}" in loser_err and "cancel" in loser_err, loser_err
    assert job_folders(stack) == {winner_id}, "the refused submit wrote nothing"
    stack.workers.start("w")
    assert stack.wait(winner_id).state is JobState.SUCCEEDED
    assert_exactly_once(stack.output, keys_of(digits, "34"[winners[0]]), stack.store)


def test_two_submitters_in_one_process_race_for_a_fresh_prefix(stack, digits):
    barrier, outcomes = threading.Barrier(2), []

    def submit(cls: str) -> None:
        barrier.wait()
        try:
            outcomes.append(("ok", stack.client.submit(stack.spec(digits.s3_prefix + cls + "/"))[0], cls))
        except (OutputBusy, SpecError) as e:
            outcomes.append(("refused", str(e), cls))

    threads = [threading.Thread(target=submit, args=(c,)) for c in ("5", "6")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o[0] for o in outcomes) == ["ok", "refused"], outcomes
    (_, job_id, cls), = [o for o in outcomes if o[0] == "ok"]
    assert job_id in [o for o in outcomes if o[0] == "refused"][0][1]
    stack.workers.start("w")
    assert stack.wait(job_id).state is JobState.SUCCEEDED
    assert_exactly_once(stack.output, keys_of(digits, cls), stack.store)


def test_readers_see_the_previous_job_while_a_rerun_is_half_done(stack, slow_s3, digits):
    stack.workers.start("w")
    first = stack.submit(digits.s3_prefix + "7/")
    assert stack.wait(first).state is JobState.SUCCEEDED
    before = read_table(stack.output, stack.store)
    stack.workers.stop("w")
    stack.workers.start("slow", env=via(slow_s3))
    rerun, _ = stack.client.submit(stack.spec(digits.s3_prefix, shard_size=40, read_concurrency=1), overwrite=True)
    deadline = time.monotonic() + 120
    while ShardState.COMMITTED not in stack.client.ledger.shard_states(rerun).values():
        assert time.monotonic() < deadline, "no shard of the rerun committed"
        time.sleep(0.05)
    assert not stack.client.ledger.state(rerun).terminal  # half done: some shards committed, some not

    during = read_table(stack.output, stack.store)
    assert during.equals(before), "a half-finished rerun changed what readers see"
    assert success_record(stack.output, stack.store).job_id == first
    assert stack.wait(rerun).state is JobState.SUCCEEDED
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_cancelled_prefix_needs_overwrite_and_its_parts_are_never_read(stack, digits):
    job_id = stack.submit(digits.s3_prefix + "8/")  # no worker: it stays queued
    stack.client.cancel(job_id)
    with pytest.raises(SpecError, match=job_id):
        stack.client.submit(stack.spec(digits.s3_prefix + "9/"))
    again, _ = stack.client.submit(stack.spec(digits.s3_prefix + "9/"), overwrite=True)
    stack.workers.start("w")
    assert stack.wait(again).state is JobState.SUCCEEDED
    assert_exactly_once(stack.output, keys_of(digits, "9"), stack.store)
    assert job_folders(stack) == {again}


@pytest.mark.parametrize("shard_size", [200, 40], ids=["one-shard", "many-shards"])
def test_cancel_then_retry_reruns_every_uncommitted_shard_and_succeeds(stack, slow_s3, digits, shard_size):
    stack.workers.start("slow", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, shard_size=shard_size, read_concurrency=1)
    running = stack.running_shard(job_id)
    cancelled = stack.cli(["cancel", job_id])
    assert cancelled.returncode == 0, cancelled.stderr
    deadline = time.monotonic() + 60  # the running shard stands down at its next progress report
    while stack.client.ledger.shard_states(job_id)[running] is ShardState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.client.ledger.shard_states(job_id)[running] is not ShardState.RUNNING

    retried = stack.cli(["retry", job_id])
    assert retried.returncode == 0, retried.stdout + retried.stderr
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_submit_into_a_full_redis_fails_in_one_line_and_writes_nothing(stack, digits):
    stack.client.ledger.r.config_set("maxmemory-policy", "noeviction")
    stack.client.ledger.r.config_set("maxmemory", 1)
    try:
        result = cli_submit(stack, digits.s3_prefix)
    finally:
        stack.client.ledger.r.config_set("maxmemory", 0)
    assert result.returncode != 0
    assert "out of memory" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(stack.store.list(stack.output)) == [], "nothing was written under the output prefix"


def test_a_worker_whose_redis_fills_up_mid_shard_does_not_ack_and_the_shard_comes_back(stack, slow_s3, digits):
    stack.workers.start("slow", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(job_id)
    r = stack.client.ledger.r
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        deadline = time.monotonic() + 60  # the worker meets the full Redis at its next progress report
        while "Redis failed" not in stack.workers.log("slow") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Redis failed" in stack.workers.log("slow"), stack.workers.log("slow")[-3000:]
        assert r.hlen("unacked") >= 1, "the shard's message was acknowledged"
        assert stack.client.ledger.status(job_id).failed_shards == {}
    finally:
        r.config_set("maxmemory", 0)
    try:
        status = stack.wait(job_id)
    except TimeoutError:
        raise AssertionError(stack.workers.log("slow")[-6000:]) from None
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert_exactly_once(stack.output, digits.keys, stack.store)


def _finetune(stack, digits, seed: int) -> str:
    spec = FinetuneSpec(train=digits.s3_prefix, output=stack.output, config=TINY_VIT, epochs=1, batch_size=32,
                        augment="none", val_split=0.2, seed=seed)
    job_id, _ = stack.client.submit(spec, overwrite=True)
    status = stack.wait(job_id, timeout_s=300)
    assert status.state is JobState.SUCCEEDED, explain(status)
    return job_id


def test_finetune_and_evaluate_with_overwrite_run_again_for_real(stack, digits):
    stack.workers.start("w")
    first = _finetune(stack, digits, seed=0)
    second = _finetune(stack, digits, seed=1)

    record = success_record(stack.output, stack.store)
    assert record.job_id == second and record.model == f"{JOBS_DIR}/{second}"
    assert job_folders(stack) == {second}
    metrics = json.loads(stack.store.read(join(stack.output, record.model, "metrics.json")))
    assert metrics["labels"] == [str(d) for d in range(10)] and metrics["epochs"]
    # The workers run with OMP_NUM_THREADS=1 (one core each for inference shards); training takes them all.
    assert metrics["threads"] == len(os.sched_getaffinity(0))
    assert {p.name.rsplit("/", 1)[1] for p in record.parts} >= {"config.json", "model.safetensors"}
    assert first != second

    evals = []
    for _ in range(2):
        spec = EvaluateSpec(input=digits.s3_prefix, model=stack.output, output=stack.output.rstrip("/") + "-eval/")
        job_id, _ = stack.client.submit(spec, overwrite=True)
        assert stack.wait(job_id, timeout_s=300).state is JobState.SUCCEEDED
        evals.append(job_id)
    eval_record = success_record(spec.output, stack.store)
    assert eval_record.job_id == evals[1] != evals[0]
    predictions = read_table(spec.output, stack.store)
    assert predictions.num_rows == len(digits.keys)
    metrics_part = next(p.name for p in eval_record.parts if p.name.endswith("/metrics.json"))
    eval_metrics = json.loads(stack.store.read(join(spec.output, metrics_part)))
    assert eval_metrics["threads"] == len(os.sched_getaffinity(0))

    # The fine-tuned prefix works as --model for classify: it resolves to the latest succeeded job's model.
    classify = parse_spec({"kind": "classify", "input": digits.s3_prefix + "0/", "output": stack.output.rstrip("/")
                           + "-classify/", "model": stack.output})
    job_id, _ = stack.client.submit(classify)
    assert stack.wait(job_id).state is JobState.SUCCEEDED
    assert_exactly_once(classify.output, keys_of(digits, "0"), stack.store)


def test_an_expired_job_says_so_and_points_at_its_record(stack):
    result = stack.cli(["status", "20200101-000000-abcdef"])
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr and SUCCESS_FILE in result.stdout + result.stderr
