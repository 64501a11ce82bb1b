"""Redis crashes, restarts from its append-only file, drops connections, or is down at submit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
import redis
from chaos_stack import assert_exactly_once, explain, via

from orchestrator.lifecycle.states import JobState

pytestmark = pytest.mark.chaos


def test_redis_killed_mid_job_and_restarted_from_its_append_only_file(stack, slow_s3, digits):
    worker = stack.workers.start("w", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(job_id)
    stack.redis.kill()
    time.sleep(3)  # long enough for the worker's heartbeats, progress and broker connection to fail
    stack.redis.start()
    status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    assert worker.poll() is None, "the worker reconnected instead of dying"
    assert "Connection to broker lost" in stack.workers.log("w"), "the worker felt the crash"
    assert_exactly_once(stack.output, digits.keys, stack.store)


class ConnectionKiller(threading.Thread):
    """`CLIENT KILL TYPE normal` every `every_s` until stopped: each client's connections drop."""

    def __init__(self, server, every_s: float = 0.7, watch_pid: int | None = None) -> None:
        super().__init__(name="client-killer", daemon=True)
        self.admin = redis.Redis(host="127.0.0.1", port=server.port, password=server.password)
        self.port, self.watch_pid = server.port, watch_pid
        self.every_s, self.rounds, self.dropped, self.dropped_watched = every_s, 0, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.dropped_watched += self._watched_connections()
            self.dropped += self.admin.client_kill_filter(_type="normal", skipme=True)
            self.rounds += 1

    def _watched_connections(self) -> int:
        """How many of the server's normal clients are the watched process's sockets (about to be dropped)."""
        if self.watch_pid is None:
            return 0
        ports = {c.laddr.port for c in psutil.Process(self.watch_pid).net_connections(kind="tcp")
                 if c.raddr and c.raddr.port == self.port}
        return sum(int(client["addr"].rsplit(":", 1)[1]) in ports for client in self.admin.client_list(_type="normal"))

    def __enter__(self) -> ConnectionKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join()


def test_redis_dropping_every_client_connection_again_and_again(stack, slow_s3, digits):
    worker = stack.workers.start("w", env=via(slow_s3))
    job_id = stack.submit(digits.s3_prefix, read_concurrency=1)
    stack.running_shard(job_id)
    with ConnectionKiller(stack.redis, watch_pid=worker.pid) as killer:
        status = stack.wait(job_id)

    assert killer.dropped >= 3, f"only {killer.dropped} connections dropped in {killer.rounds} rounds"
    # The worker's own sockets were among them; its clients retry through a dropped connection
    # (orchestrator/fleet/redisendpoint.py), so the worker need not log a lost broker to have felt it.
    assert killer.dropped_watched >= 3, f"only {killer.dropped_watched} of the worker's connections dropped"
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert worker.poll() is None, "the worker reconnected instead of dying"
    assert_exactly_once(stack.output, digits.keys, stack.store)


def _take_down(server, outage: str) -> None:
    if outage == "killed":
        server.kill()  # connections are refused at once
    else:
        os.kill(server.pid, signal.SIGSTOP)  # a hung host: connections open, nothing ever answers


def _bring_back(server, outage: str) -> None:
    if outage == "killed":
        server.start()
    else:
        os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_submitting_while_redis_is_down_fails_fast_and_leaves_nothing_behind(stack, digits, outage):
    _take_down(stack.redis, outage)
    try:
        result = stack.cli(["submit", "classify", "--input", digits.s3_prefix, "--output", stack.output,
                            "--model", str(stack.model), "--shard-size", "50"], timeout_s=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`vitbatch submit` hung for 30 s against a {outage} Redis instead of failing")
    finally:
        _bring_back(stack.redis, outage)

    assert result.returncode != 0
    assert "Redis" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(stack.store.list(stack.output)) == [], "nothing was written under the output prefix"
    assert stack.client.ledger.r.dbsize() == 0, "nothing was enqueued or recorded"
