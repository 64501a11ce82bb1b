"""The job ledger in this process's memory: what a whole job run here (workers/inprocess.py, bench/)
records its units in, so it goes through the same lifecycle as a queued job.

The same semantics as the Redis ledger (ledger.py, whose Lua scripts in fencing.py this follows
step by step): leases with fencing tokens, deliveries counted towards quarantine, progress that
only grows, a commit or quarantine that says when the job has settled, one publication claim, a
job that ends once and frees its prefix. The clock is this host's (there is no other). One lock
makes each call atomic, as a script is in Redis: a bench may run units on threads, and a unit's
heartbeat beats on its own thread. tests/ledger_contract.py holds both ledgers to one contract.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Concatenate, ParamSpec, TypeVar

from orchestrator.errors import JobNotFound, OutputBusy, StaleDelivery
from orchestrator.lifecycle.fencing import PUBLISH_CLAIM_S, Lease, Publication
from orchestrator.lifecycle.leases import OUTPUT_LEASE_GRACE_S
from orchestrator.lifecycle.states import JobState, JobStatus, ShardState

P = ParamSpec("P")
R = TypeVar("R")


def _atomic(method: Callable[Concatenate[MemoryLedger, P], R]) -> Callable[Concatenate[MemoryLedger, P], R]:
    """One call at a time, as each ledger write is one script in Redis."""
    @wraps(method)
    def locked(self: MemoryLedger, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass
class _Unit:
    state: ShardState = ShardState.PENDING
    token: int = 0
    attempts: int = 0
    heartbeat: float = 0.0
    done: int = 0
    errors: int = 0
    stats: dict = field(default_factory=dict)
    reason: str = ""  # why it was quarantined
    last_error: str = ""
    found_items: int = 0  # items found inside a tar shard


@dataclass
class _Job:
    spec_json: str
    kind: str
    output: str
    n_items: int
    carried: int
    created_at: float
    units: dict[int, _Unit]
    state: JobState = JobState.QUEUED
    reason: str = ""
    finished_at: float = 0.0
    publisher: str = ""
    publish_claimed_at: float = 0.0
    publish_finished_at: float = 0.0

    @property
    def live(self) -> bool:
        return not self.state.terminal

    @property
    def settled(self) -> bool:
        return all(u.state in (ShardState.COMMITTED, ShardState.FAILED) for u in self.units.values())


class MemoryLedger:
    """A JobLedger (ledgers.py) held in this process; forgotten with it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._outputs: dict[str, tuple[str, float]] = {}  # output -> (holder, since)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in this process's ledger")
        return job

    def _fenced(self, lease: Lease) -> _Unit:
        """The delivery's unit while its lease is the unit's and the job is live; StaleDelivery otherwise."""
        job = self._jobs.get(lease.job_id)
        unit = job.units.get(lease.shard) if job is not None else None
        if job is None or unit is None or unit.token != lease.token:
            raise StaleDelivery(f"job {lease.job_id} shard {lease.shard}: lease {lease.token} was handed to a "
                                "later delivery; this one writes nothing more")
        if not job.live:
            raise StaleDelivery(f"job {lease.job_id} has ended ({job.state.value}); shard {lease.shard} writes "
                                "nothing more", job.state.value)
        return unit

    def now(self) -> float:
        return time.time()

    # -- recording a job -------------------------------------------------------------------
    @_atomic
    def hold_output(self, output: str, job_id: str) -> None:
        holder, since = self._outputs.get(output, ("", 0.0))
        if holder and holder != job_id:
            job = self._jobs.get(holder)
            ended = job is not None and not job.live
            lapsed = job is None and self.now() - since > OUTPUT_LEASE_GRACE_S
            if not (ended or lapsed):
                raise OutputBusy(f"{output} is held by job {holder}, which is still queued or running")
        self._outputs[output] = (job_id, self.now())

    @_atomic
    def release_output(self, output: str, job_id: str) -> None:
        if self._outputs.get(output, ("", 0.0))[0] == job_id:
            del self._outputs[output]

    @_atomic
    def create(self, job_id: str, spec_json: str, kind: str, output: str, n_items: int, n_shards: int,
               carried: int = 0) -> None:
        self._jobs[job_id] = _Job(spec_json, kind, output, n_items + carried, carried, self.now(),
                                  {i: _Unit() for i in range(n_shards)})

    # -- a delivery of a unit --------------------------------------------------------------
    @_atomic
    def state(self, job_id: str) -> JobState:
        return self._job(job_id).state

    @_atomic
    def spec_json(self, job_id: str) -> str:
        return self._job(job_id).spec_json

    @_atomic
    def start_shard(self, job_id: str, shard: int, count: bool = True) -> Lease:
        job = self._jobs.get(job_id)
        if job is None or not job.live:
            state = job.state.value if job is not None else ""
            raise StaleDelivery(f"job {job_id} has ended ({state}): shard {shard} is not run", state)
        unit = job.units.setdefault(shard, _Unit())
        unit.attempts += 1 if count else 0
        unit.token += 1
        if count and unit.state is not ShardState.COMMITTED:
            unit.state, unit.heartbeat = ShardState.RUNNING, self.now()
            if job.state is JobState.QUEUED:
                job.state = JobState.RUNNING
        return Lease(job_id, shard, unit.token, unit.attempts if count else 0)

    @_atomic
    def progress(self, lease: Lease, done: int) -> None:
        unit = self._running(lease)
        unit.done = max(unit.done, done)

    @_atomic
    def heartbeat(self, lease: Lease) -> None:
        self._running(lease).heartbeat = self.now()

    def _running(self, lease: Lease) -> _Unit:
        unit = self._fenced(lease)
        if unit.state is not ShardState.RUNNING:
            raise StaleDelivery(f"job {lease.job_id} shard {lease.shard} is {unit.state.value}, not this "
                                "delivery's to run")
        return unit

    @_atomic
    def hold_for(self, lease: Lease, seconds: float) -> None:
        self._fenced(lease).heartbeat = self.now() + seconds

    @_atomic
    def stand_down(self, lease: Lease) -> None:
        unit = self._jobs[lease.job_id].units[lease.shard] if lease.job_id in self._jobs else None
        if unit is None or unit.token != lease.token:
            raise StaleDelivery(f"job {lease.job_id} shard {lease.shard}: lease {lease.token} was handed on")
        if unit.state is ShardState.RUNNING:
            unit.state = ShardState.PENDING
        unit.heartbeat = 0.0

    @_atomic
    def record_commit(self, lease: Lease, done: int, errors: int, stats: dict) -> bool:
        unit = self._fenced(lease)
        if unit.state is ShardState.FAILED:
            raise StaleDelivery(f"job {lease.job_id} shard {lease.shard} was quarantined; this delivery's "
                                "commit is not recorded")
        unit.state, unit.heartbeat, unit.done, unit.errors = ShardState.COMMITTED, 0.0, done, errors
        unit.stats, unit.reason = dict(stats), ""
        return self._jobs[lease.job_id].settled

    @_atomic
    def fail_shard(self, lease: Lease, reason: str) -> bool:
        unit = self._fenced(lease)
        unit.state, unit.reason = ShardState.FAILED, reason
        return self._jobs[lease.job_id].settled

    @_atomic
    def note_shard_error(self, job_id: str, shard: int, reason: str) -> None:
        self._job(job_id).units.setdefault(shard, _Unit()).last_error = reason[:2000]

    @_atomic
    def last_shard_error(self, job_id: str, shard: int) -> str:
        unit = self._jobs[job_id].units.get(shard) if job_id in self._jobs else None
        return unit.last_error if unit is not None else ""

    @_atomic
    def shard_items(self, job_id: str, shard: int, n_items: int) -> None:
        self._job(job_id).units.setdefault(shard, _Unit()).found_items = n_items

    @_atomic
    def set_total(self, job_id: str, n_items: int) -> None:
        self._job(job_id).n_items = n_items

    @_atomic
    def shard_states(self, job_id: str) -> dict[int, ShardState]:
        job = self._jobs.get(job_id)
        return {i: u.state for i, u in job.units.items()} if job is not None else {}

    @_atomic
    def heartbeats(self, job_id: str) -> dict[int, float]:
        job = self._jobs.get(job_id)
        return {i: u.heartbeat for i, u in job.units.items() if u.heartbeat} if job is not None else {}

    # -- ending the job --------------------------------------------------------------------
    @_atomic
    def set_state(self, job_id: str, state: JobState, reason: str = "", lease: Lease | None = None,
                  publication: Publication | None = None) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.live:
            return False
        if lease is not None and job.units.get(lease.shard, _Unit()).token != lease.token:
            return False
        if publication is not None:
            if job.publisher != publication.claimer:
                return False
        elif job.publisher and self.now() - job.publish_claimed_at < PUBLISH_CLAIM_S:
            return False  # someone is publishing the job: its end is theirs to record
        job.state, job.reason = state, reason or job.reason
        if state.terminal:
            job.finished_at = self.now()
            self.release_output(job.output, job_id)
        return True

    @_atomic
    def status(self, job_id: str) -> JobStatus:
        job = self._job(job_id)
        units = job.units.values()
        counts = {s.value: 0 for s in ShardState}
        for unit in units:
            counts[unit.state.value] += 1
        return JobStatus(
            job_id=job_id, kind=job.kind, state=job.state, output=job.output,
            n_items=job.n_items + sum(u.found_items for u in units), n_shards=len(job.units),
            done=sum(u.done for u in units), errors=sum(u.errors for u in units), shards=counts,
            failed_shards={i: u.reason for i, u in job.units.items() if u.state is ShardState.FAILED},
            reason=job.reason, carried=job.carried, created_at=job.created_at, finished_at=job.finished_at,
        )

    @_atomic
    def shard_stats(self, job_id: str) -> dict[int, dict]:
        job = self._job(job_id)
        return {i: dict(u.stats) for i, u in job.units.items() if u.state is ShardState.COMMITTED}

    @_atomic
    def claim_publication(self, job_id: str) -> Publication | None:
        job = self._jobs.get(job_id)
        if job is None or not job.live or not job.settled:
            return None
        claimer, now = secrets.token_hex(8), self.now()
        if job.publisher and now - job.publish_claimed_at < PUBLISH_CLAIM_S:
            return None
        job.publisher, job.publish_claimed_at = claimer, now
        job.publish_finished_at = job.publish_finished_at or now
        return Publication(job_id, claimer, job.publish_finished_at, self._outputs.get(job.output, ("", 0.0))[0])

    @_atomic
    def release_publication(self, publication: Publication) -> None:
        job = self._jobs.get(publication.job_id)
        if job is not None and job.publisher == publication.claimer:
            job.publisher = ""
