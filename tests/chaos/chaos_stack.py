"""One chaos test's private world (its Redis, settings, client, killable workers, CLI) and the
exactly-once check every fault test ends with."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import redis
from kombu.exceptions import OperationalError
from support import ROOT, WorkerPool  # noqa: F401  (ROOT is re-exported to the chaos tests)

from orchestrator.config import Settings
from orchestrator.constants import commit_name, shard_attempts_key, shard_done_key
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.states import JobStatus, ShardState
from orchestrator.published.outputs import job_dir
from orchestrator.published.results import committed_parts, read_table
from orchestrator.stack.processes import RedisServer
from orchestrator.store.storage import ObjectStore, join
from orchestrator.submission.submit import Client

REDIS_DOWN = (redis.RedisError, OperationalError, ConnectionError)


def via(proxy) -> dict[str, str]:
    """Worker environment that sends its S3 traffic through `proxy` (a FaultyS3)."""
    return {"VITBATCH_S3_ENDPOINT_URL": proxy.url}


class ChaosWorkers(WorkerPool):
    """The shared worker pool, plus what fault tests need: pool children and a hard stop."""

    def pool_children(self, name: str) -> list[int]:
        return [child.pid for child in psutil.Process(self.procs[name].pid).children()]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the test is over; nothing left to protect
            proc.wait()


@dataclass
class Stack:
    redis: RedisServer
    settings: Settings
    env: dict[str, str]
    client: Client
    workers: ChaosWorkers
    output: str
    model: Path
    submitted: list[str] = field(default_factory=list)

    @property
    def store(self) -> ObjectStore:
        return self.client.store

    def spec(self, input_uri: str, **overrides):
        return parse_spec({"kind": "classify", "input": input_uri, "output": self.output, "model": str(self.model),
                           "batch_size": 4, "shard_size": 100, **overrides})

    def submit(self, input_uri: str, **overrides) -> str:
        job_id, _ = self.client.submit(self.spec(input_uri, **overrides))
        self.submitted.append(job_id)
        return job_id

    def cli(self, args: list[str], timeout_s: float = 120, env: dict[str, str] | None = None):
        """`vitbatch ARGS` in its own process, against this test's Redis."""
        return subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", *args], env={**self.env, **(env or {})},
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)

    def folder(self, job_id: str) -> str:
        """Where the job writes its manifests, parts and markers."""
        return job_dir(self.output, job_id)

    def attempts(self, job_id: str) -> dict[int, int]:
        return {int(i): int(n) for i, n in self.client.ledger.r.hgetall(shard_attempts_key(job_id)).items()}

    def running_shard(self, job_id: str, timeout_s: float = 120) -> int:
        """The first shard the ledger shows running with some items done and no commit marker yet."""
        return self.running_shards(job_id, 1, timeout_s)[0]

    def running_shards(self, job_id: str, count: int, timeout_s: float = 120) -> list[int]:
        """`count` shards the ledger shows running at once, each with some items done and no commit marker."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = self.client.ledger.r.hgetall(shard_done_key(job_id))
            running = [shard for shard, state in sorted(self.client.ledger.shard_states(job_id).items())
                       if state is ShardState.RUNNING and int(done.get(str(shard), 0)) > 0
                       and not self.store.exists(join(self.folder(job_id), commit_name(shard)))]
            if len(running) >= count:
                return running[:count]
            time.sleep(0.05)
        raise TimeoutError(f"{count} shards of {job_id} were not seen running at once within {timeout_s} s")

    def wait(self, job_id: str, timeout_s: float = 180) -> JobStatus:
        """client.wait (which also reconciles), riding out Redis being down or dropping connections."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.client.wait(job_id, poll_s=0.25, timeout_s=max(1.0, deadline - time.monotonic()))
            except REDIS_DOWN:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def explain(status: JobStatus) -> str:
    return f"job {status.state.value}: failed shards {status.failed_shards}, reason {status.reason!r}"


def classified(row: dict) -> bool:
    """A classify row has a result (a label) or an error reason, never both nor neither."""
    has_result = row["error"] is None and row["label"] is not None
    has_reason = bool(row["error"]) and row["label"] is None
    return has_result or has_reason


def assert_exactly_once(output_uri: str, expected_keys, store: ObjectStore,
                        row_ok: Callable[[dict], bool] = classified) -> None:
    """Every accepted input key is in the committed output exactly once, with a result or a reason
    (`row_ok`: a classify row's label or error by default).

    Each committed part must also be byte for byte the part its marker describes, so a duplicate
    delivery that rewrote a part after the marker was written cannot pass unnoticed.
    """
    for uri in committed_parts(output_uri, store):
        data = store.read(uri)
        shard = int(uri.rsplit("part-", 1)[1].split(".")[0])
        folder = uri.rsplit("/", 1)[0]  # the job's folder, which holds its markers
        recorded = json.loads(store.read(join(folder, commit_name(shard))))["parts"][uri.rsplit("/", 1)[1]]
        assert recorded["sha256"] == hashlib.sha256(data).hexdigest(), f"{uri} is not the part its marker names"
        pq.read_table(io.BytesIO(data))
    table = read_table(output_uri, store)
    counts = Counter(table.column("key").to_pylist())
    expected = set(expected_keys)
    missing = sorted(expected - counts.keys())
    unexpected = sorted(counts.keys() - expected)
    duplicated = {key: n for key, n in counts.items() if n > 1}
    assert not missing, f"{len(missing)} input keys have no output row, e.g. {missing[:5]}"
    assert not unexpected, f"{len(unexpected)} output keys were never input, e.g. {unexpected[:5]}"
    assert not duplicated, f"{len(duplicated)} keys appear more than once, e.g. {list(duplicated.items())[:5]}"
    for row in table.to_pylist():
        assert row_ok(row), f"row {row['key']} has neither a result nor an error reason: {row}"
