"""Workers on three hosts (network namespaces on a bridge) against one hub, Redis through three
sentinels: partitions, a host joining, S3 unreachable from one host, Redis killed -9 and
restarted, a worker whose clock is minutes off, and last, the primary's host cut off (the
replica is promoted). Every scenario ends with the exactly-once check: _SUCCESS.json names the
job and lists exactly its parts, each the bytes its record and marker name, and every input key
is in them once."""

from __future__ import annotations

import signal
import time

import pytest

from orchestrator.lifecycle.states import JobState

pytestmark = [pytest.mark.hosts, pytest.mark.chaos]


def explain(status) -> str:
    return f"job {status.job_id} {status.state.value}: failed shards {status.failed_shards}, reason {status.reason!r}"


def some_holder(world, job_id: str, hosts=("w1", "w2", "w3")):
    for host in hosts:
        shard = world.held_by(host, job_id)
        if shard is not None:
            return host, shard
    return None


def test_a_host_cut_off_mid_shard_loses_the_shard_to_another_host(world):
    output = world.output("cut-mid-shard")
    job_id = world.submit(output)
    host, shard = world.wait_until(f"a host is working on a shard of {job_id}", lambda: some_holder(world, job_id))
    world.lab.cut(host, "link")
    try:
        world.wait_until(f"the reconciler gives shard {shard} up", lambda: world.status(job_id).requeued)
    finally:
        world.lab.heal(host)
    status = world.wait_ended(job_id)
    assert status.state is JobState.SUCCEEDED, explain(status)
    world.wait_until(f"{host} is done with its old delivery", lambda: world.idle(host))
    world.exactly_once(output, job_id)
    assert world.status(job_id).state is JobState.SUCCEEDED


def test_a_host_returning_during_an_overwrite_rerun_does_not_republish_the_replaced_job(world):
    """Job A ends while w2 is cut off holding one of its shards; B takes A's prefix with --overwrite.
    w2 comes back while B runs (the other hosts are cut off then, so B cannot end before w2 has
    finished with A's shard): B succeeds, its folder whole, and A is not published again."""
    output = world.output("overwrite")
    job_a = world.submit(output)
    world.wait_until(f"w2 is working on a shard of {job_a}", lambda: world.held_by("w2", job_a) is not None)
    world.lab.cut("w2", "drop")
    try:
        status_a = world.wait_ended(job_a)
        assert status_a.state is JobState.SUCCEEDED, explain(status_a)
        job_b = world.submit(output, "--overwrite")
        world.wait_until(f"{job_b} has committed a shard", lambda: world.status(job_b).done > 0)
        for host in ("w1", "w3"):
            world.lab.cut(host, "drop")
        world.lab.heal("w2")
        world.wait_until(f"w2 is done with its delivery of {job_a}", lambda: world.idle("w2", job_a),
                         detail=lambda: "meanwhile " + explain(world.status(job_b)))
    finally:
        for host in ("w1", "w2", "w3"):
            world.lab.heal(host)
    status_b = world.wait_ended(job_b)
    assert status_b.state is JobState.SUCCEEDED, explain(status_b)
    for host in ("w1", "w2", "w3"):
        world.wait_until(f"{host} is done with its deliveries", lambda host=host: world.idle(host))
    world.exactly_once(output, job_b)  # B's record is the one published, and its folder is whole
    assert world.status(job_a).state is JobState.SUCCEEDED


def test_a_host_that_joins_mid_job_takes_shards(world):
    output = world.output("join")
    job_id = world.submit(output)
    try:
        world.wait_until(f"{job_id} is under way", lambda: world.status(job_id).done > 0)
        for host in ("w1", "w2", "w3"):
            world.lab.slow_s3(host, "1kbit")  # the hosts there crawl: that is why one is added
        world.fleet.start_worker("w4")
        world.wait_until("w4 commits a shard", lambda: world.shards_committed_by("w4") >= 1)
    finally:
        for host in ("w1", "w2", "w3"):
            world.lab.slow_s3(host)
    status = world.wait_ended(job_id)
    assert status.state is JobState.SUCCEEDED, explain(status)
    world.exactly_once(output, job_id)
    world.fleet.stop_worker("w4")


def test_redis_killed_and_restarted_mid_job_loses_nothing_and_clients_ride_it_out(world):
    output = world.output("redis-restart")
    job_id = world.submit(output)
    waiter = world.fleet.cli_background(f"wait-{job_id}", "wait", job_id)
    try:
        world.wait_until(f"{job_id} is under way", lambda: world.status(job_id).done > 0)
        world.redis.kill_primary()  # kill -9: the append-only file (fsync always) keeps what was acknowledged
        time.sleep(3)  # down long enough for every client to notice (and too short for a failover)
        world.redis.restart_primary()
        rc = waiter.wait(timeout=300)
    finally:
        if waiter.poll() is None:
            waiter.send_signal(signal.SIGKILL)
    log = world.fleet.log(f"wait-{job_id}").read_text(errors="replace")
    assert rc == 0, f"`vitbatch wait` exited {rc}: {log[-3000:]}"
    reconciler = world.fleet.procs["reconciler"]
    assert reconciler.poll() is None, (f"`vitbatch reconcile --loop` exited {reconciler.returncode}: "
                                       + world.fleet.log("reconciler").read_text(errors="replace")[-3000:])
    status = world.wait_ended(job_id)
    assert status.state is JobState.SUCCEEDED, explain(status)
    world.exactly_once(output, job_id)


def test_a_host_that_cannot_reach_s3_gives_its_shard_up(world):
    received_before = world.received("w3")
    others = [name for name in world.lab.hosts if name.startswith("w") and name != "w3"]
    world.lab.drop_s3("w3")
    try:
        output = world.output("s3-dropped")
        for name in others:  # until w3 holds a shard: on a loaded machine the others could take them all
            world.lab.cut(name)
        try:
            job_id = world.submit(output)
            world.wait_until("w3 takes a shard", lambda: world.received("w3") > received_before)
        finally:
            for name in others:
                world.lab.heal(name)
        status = world.wait_ended(job_id)
    finally:
        world.lab.drop_s3("w3", False)
    assert status.state is JobState.SUCCEEDED, explain(status)
    world.wait_until("w3 is done with its delivery", lambda: world.idle("w3"))
    world.exactly_once(output, job_id)
    assert world.status(job_id).state is JobState.SUCCEEDED


def test_a_worker_whose_clock_is_five_minutes_behind_commits_its_shards_once(world):
    """Grants, heartbeats and progress are stamped by Redis's clock, and the reconciler measures
    their age by it: a host whose own clock is minutes off still holds its shards. (Stamped by
    the worker's clock, they looked five minutes silent: every shard was handed on, stood aside
    and was quarantined.) The other hosts are cut off, so every commit is the skewed host's."""
    world.fleet.start_worker("w5", clock_offset="-5m")
    others = ("w1", "w2", "w3")
    try:
        world.fleet.wait_ready("w5")
        for name in others:
            world.lab.cut(name)
        output = world.output("clock-behind")
        job_id = world.submit(output, "--shard-size", "10")  # shards of seconds: the reconciler sees them run
        status = world.wait_ended(job_id)
    finally:
        for name in others:
            world.lab.heal(name)
    world.fleet.stop_worker("w5")
    assert status.state is JobState.SUCCEEDED, explain(status)
    world.exactly_once(output, job_id)


def follow(world, group, job_id: str, cut_at: float, timeout_s: float = 150):
    """Poll the job until it ends; (status, figures): seconds from the cut to the promotion, to the
    first progress after it, and to the job's end, and the longest time without progress."""
    promoted_at = first_progress_at = None
    last_done, last_change = world.status(job_id).done, cut_at
    longest_gap_s = 0.0
    while True:
        status = world.status(job_id)
        now = time.monotonic()
        if promoted_at is None and world.lab.call(group.promoted):
            promoted_at = now
        if status.done != last_done:
            longest_gap_s = max(longest_gap_s, now - last_change)
            last_done, last_change = status.done, now
            if promoted_at is not None and first_progress_at is None:
                first_progress_at = now
        if status.state.terminal:
            break
        if now - cut_at > timeout_s:
            raise AssertionError(f"not within {timeout_s} s of the cut: job {job_id} ends ({explain(status)}, "
                                 f"{status.done} items done, promoted: {promoted_at is not None})")
        time.sleep(0.3)
    figures = {"promoted_s": promoted_at and promoted_at - cut_at,
               "first_progress_after_promotion_s": first_progress_at and first_progress_at - cut_at,
               "ended_s": now - cut_at, "longest_without_progress_s": longest_gap_s}
    return status, figures


def test_the_primarys_host_cut_off_mid_job_the_replica_takes_over_and_every_key_is_written_once(world):
    """Last: the lab's Redis stays on the replica. The sentinel on the primary's host is first in
    every client's URL, so each lookup meets the cut-off one first, as a vanished host would do."""
    group = world.redis
    world.lab.call(group.fail_over_after)
    output = world.output("primary-cut")
    job_id = world.submit(output)
    world.wait_until(f"{job_id} is under way", lambda: world.status(job_id).done > 0)
    world.lab.cut(group.primary_host, "link")
    cut_at = time.monotonic()

    status, figures = follow(world, group, job_id, cut_at)
    print(f"\nprimary cut off: {', '.join(f'{k} {v:.1f}' for k, v in figures.items() if v is not None)}")

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert figures["promoted_s"] is not None, "the sentinels promoted the replica"
    world.exactly_once(output, job_id)
