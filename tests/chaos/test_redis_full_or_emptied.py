"""Redis refuses writes at maxmemory, or loses every key (emptied, or a new instance without the data).

A full Redis is ridden out like an outage: `wait` and `reconcile --loop` keep going and the job
finishes once memory is freed. A job Redis lost is unknown to `status` and `wait` (exit 3) and is
never recreated as a fragment; an `--overwrite` rerun of its output succeeds, and `vitbatch
recover` rebuilds it from its output's records so that it completes with every key once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_stack import ROOT, assert_exactly_once, explain, via

from orchestrator.constants import SUCCESS_FILE, job_key, job_state_channel
from orchestrator.fleet.fleetmetrics import FleetCollector
from orchestrator.lifecycle.reconcile import reconcile
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.store.storage import join

pytestmark = pytest.mark.chaos
UNKNOWN_JOB_EXIT = 3


def _background(stack, args: list[str], stderr: Path) -> subprocess.Popen:
    """`vitbatch ARGS` left running, its stderr in a file the test can read meanwhile."""
    with open(stderr, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.commands.cli", *args], env=stack.env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=sink, stdin=subprocess.DEVNULL)


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not seen within {timeout_s} s: {what}")
        time.sleep(0.2)


def _said(path: Path, text: str, proc: subprocess.Popen) -> bool:
    """`text` is in the process's stderr; fails at once when the process has exited instead."""
    if proc.poll() is not None:
        pytest.fail(f"exited {proc.returncode} instead of riding out a full Redis:\n{path.read_text()[-3000:]}")
    return text in path.read_text(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def test_wait_and_the_reconcile_loop_ride_out_a_full_redis_and_the_job_finishes(stack, slow_s3, digits, tmp_path):
    stack.workers.start("doomed", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(job_id)
    stack.workers.kill("doomed")  # its shard falls silent: handing it on is a write
    redis_admin = stack.client.ledger.r
    redis_admin.config_set("maxmemory", 1)  # every write is refused with OOM (noeviction)
    waiting = _background(stack, ["wait", job_id], tmp_path / "wait.err")
    looping = _background(stack, ["reconcile", "--loop"], tmp_path / "loop.err")
    try:
        _until(lambda: _said(tmp_path / "wait.err", "out of memory", waiting)
               and _said(tmp_path / "loop.err", "out of memory", looping), "both refused for lack of memory")
        redis_admin.config_set("maxmemory", 0)
        stack.workers.start("successor", env=via(slow_s3), wait=False)
        waited = waiting.wait(timeout=240)
        assert looping.poll() is None, (tmp_path / "loop.err").read_text()[-3000:]
    finally:
        _stop(waiting)
        _stop(looping)

    said = (tmp_path / "wait.err").read_text()
    assert waited == 0, said[-3000:]
    assert "Traceback" not in said + (tmp_path / "loop.err").read_text()
    status = stack.client.status(job_id)
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.requeued >= 1, "the silent shard was handed on once Redis took writes again"
    exported = {s.name: s.value for family in FleetCollector(stack.client.ledger).collect() for s in family.samples}
    assert exported["vitbatch_redis_oom_refusals_total"] >= 2, "each client counted the refusals it rode out"
    assert_exactly_once(stack.output, digits.keys, stack.store)


def test_a_job_redis_lost_is_unknown_and_an_overwrite_rerun_of_its_output_succeeds(stack, slow_s3, digits, tmp_path):
    stack.workers.start("w", env=via(slow_s3))
    lost = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(lost)
    waiting = _background(stack, ["wait", lost], tmp_path / "wait.err")
    channel = job_state_channel(lost)  # a wait under way listens on it between its reads
    _until(lambda: stack.client.ledger.r.pubsub_numsub(channel)[0][1] >= 1, "the wait under way")
    stack.client.ledger.r.flushall()
    passed = reconcile(stack.client, stack.settings.stale_after_s, [lost])  # as the wait's own pass does
    try:
        waited = waiting.wait(timeout=60)
    finally:
        _stop(waiting)

    rerun, _ = stack.client.submit(stack.spec(digits.s3_prefix, read_concurrency=1), overwrite=True)
    status = stack.wait(rerun)
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert json.loads(stack.store.read(join(stack.output, SUCCESS_FILE)))["job_id"] == rerun
    assert not list(stack.store.list(stack.folder(lost))), "the lost job's folder was removed with the rerun"
    assert_exactly_once(stack.output, digits.keys, stack.store)

    assert not stack.client.ledger.r.exists(job_key(lost)), "no pass recreated the lost job's hash"
    assert not passed.errors, passed
    shown = stack.cli(["status", lost])
    for exit_code, said in ((waited, (tmp_path / "wait.err").read_text()), (shown.returncode, shown.stderr)):
        assert exit_code == UNKNOWN_JOB_EXIT, said[-3000:]
        assert f"unknown job: no job '{lost}' in Redis" in said and "vitbatch recover" in said
        assert "Traceback" not in said


def test_recover_rebuilds_a_lost_job_from_its_output_and_it_completes_exactly_once(stack, slow_s3, digits):
    stack.workers.start("w", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1, shard_size=40)  # four shards, one at a time

    def committed() -> list[int]:
        return [i for i, s in stack.client.ledger.shard_states(job_id).items() if s is ShardState.COMMITTED]

    _until(lambda: len(committed()) >= 1, "a committed shard")
    kept = committed()
    assert len(kept) < 4, "the job was still running when Redis lost it"
    stack.client.ledger.r.flushall()
    recovered = stack.cli(["recover", stack.output])
    again = stack.cli(["recover", stack.output])

    assert recovered.returncode == 0, recovered.stderr
    assert f"{job_id}: recovered classify job" in recovered.stdout
    assert again.returncode == 2 and "nothing to recover" in again.stderr, again.stderr
    status = stack.wait(job_id)
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert status.n_items == len(digits.keys) and status.done == len(digits.keys)
    attempts = stack.attempts(job_id)
    assert all(attempts.get(i, 0) == 0 for i in kept), f"committed shards {kept} ran again: {attempts}"
    assert json.loads(stack.store.read(join(stack.output, SUCCESS_FILE)))["job_id"] == job_id
    assert_exactly_once(stack.output, digits.keys, stack.store)
