"""Job state and counters in Redis.

Counters are *set* per shard, never incremented, so a redelivered shard that
reports again leaves the totals right; progress only moves forward. Shard state
moves pending -> running -> committed | failed; a committed shard never goes back.
Every write a delivery makes is fenced by its lease token (fencing.py).
"""

from __future__ import annotations

import calendar
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator import constants as k
from orchestrator.config import Settings
from orchestrator.errors import BrokerUnavailable, ConfigError, JobNotFound, StaleDelivery
from orchestrator.fleet.redisendpoint import RedisEndpoint
from orchestrator.lifecycle import fencing, leases
from orchestrator.lifecycle.fencing import Lease, Publication
from orchestrator.lifecycle.states import JobState, JobStatus, ShardState


def connect(endpoint: RedisEndpoint | str) -> redis.Redis:
    """A client of the primary: a redis:// URL's server, or the one the sentinels name now."""
    endpoint = RedisEndpoint(endpoint) if isinstance(endpoint, str) else endpoint
    return endpoint.client(decode_responses=True)  # with redisendpoint's timeouts, keepalive and health checks


# A write into a job's hash only while the job is recorded (the hash holds its state): after Redis
# lost its data, a late counter must not recreate the hash as a fragment without state, spec or
# output. KEYS: job. ARGV: 'incr' or 'set', field, value. Returns nil when the job is not recorded.
_JOB_FIELD_WRITE = """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return false end
if ARGV[1] == 'incr' then return redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3]) end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 0
"""


def _text(reply: bytes | str) -> str:
    """A reply as the str it is: the ledger's clients decode replies (decode_responses=True in
    `connect`), though redis-py's types also allow bytes."""
    return cast(str, reply)


def _texts(reply: object) -> list[str]:
    """A list reply (members, or keys without scores) as the strs it holds; see `_text`."""
    return cast(list[str], reply)


class Ledger:
    def __init__(self, client: redis.Redis, url: RedisEndpoint | str | None = None,
                 job_ttl_s: int = 30 * 24 * 3600) -> None:
        self.r, self.job_ttl_s = client, job_ttl_s
        self.endpoint = RedisEndpoint(url) if isinstance(url, str) else url

    @classmethod
    def from_url(cls, url: RedisEndpoint | str, job_ttl_s: int = 30 * 24 * 3600) -> Ledger:
        return cls(connect(url), url, job_ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> Ledger:
        """The ledger at the settings' backend URL (a sentinel:// one with their master name and password)."""
        url = settings.backend_url
        if url is None:
            raise ConfigError("no Redis to keep job state in: set VITBATCH_BROKER_URL (or VITBATCH_RESULT_BACKEND)")
        return cls.from_url(settings.redis_endpoint(url), settings.job_ttl_s)

    def ping(self, timeout_s: float = 5.0) -> None:
        # A probe with a short timeout and no retries: the ledger's own client waits 30 s a try,
        # so a hung (not dead) Redis would make `submit` sit silent for a minute.
        probe = self.r if self.endpoint is None else self.endpoint.client(
            socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        try:
            probe.ping()
        except redis.RedisError as e:
            raise BrokerUnavailable(f"Redis is unreachable ({e}); nothing was enqueued") from e
        finally:
            if probe is not self.r:
                probe.close()

    # -- producer side ---------------------------------------------------------------------
    def hold_output(self, output: str, job_id: str) -> None:
        """Take the output prefix for `job_id` (see leases.py); OutputBusy when another live job holds it."""
        leases.hold_output(self.r, output, job_id)

    def release_output(self, output: str, job_id: str) -> None:
        leases.release_output(self.r, output, job_id)

    def create(self, job_id: str, spec_json: str, kind: str, output: str, n_items: int, n_shards: int,
               carried: int = 0) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.job_key(job_id), mapping={
            "state": JobState.QUEUED.value, "spec": spec_json, "kind": kind, "output": output,
            "n_items": n_items + carried, "n_shards": n_shards, "created_at": time.time(), "carried": carried,
        })
        if n_shards:
            pipe.hset(k.shard_state_key(job_id), mapping={str(i): ShardState.PENDING.value for i in range(n_shards)})
        pipe.zadd(k.JOBS_INDEX_KEY, {job_id: time.time()})
        pipe.zremrangebyscore(k.JOBS_INDEX_KEY, 0, time.time() - self.job_ttl_s)  # their keys have expired
        pipe.execute()

    def restore(self, job_id: str, spec_json: str, kind: str, output: str, n_items: int, n_shards: int, *,
                carried: int, created_at: float, committed: dict[int, tuple[int, int, dict]],
                lease_floor: int) -> None:
        """Register a job Redis lost again (recover.py): queued, its `committed` shards (shard -> rows,
        error rows, stats) committed with their counts, the others pending; every shard's lease
        counter restarts at `lease_floor`, above any token granted before the loss."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.job_key(job_id), mapping={
            "state": JobState.QUEUED.value, "spec": spec_json, "kind": kind, "output": output,
            "n_items": n_items + carried, "n_shards": n_shards, "created_at": created_at, "carried": carried,
            "recovered_at": time.time(),
        })
        if n_shards:
            pipe.hset(k.shard_state_key(job_id), mapping={
                str(i): (ShardState.COMMITTED if i in committed else ShardState.PENDING).value for i in range(n_shards)})
            pipe.hset(k.shard_lease_key(job_id), mapping={str(i): lease_floor for i in range(n_shards)})
        if committed:
            pipe.hset(k.shard_done_key(job_id), mapping={str(i): c[0] for i, c in committed.items()})
            pipe.hset(k.shard_errors_key(job_id), mapping={str(i): c[1] for i, c in committed.items()})
            pipe.hset(k.shard_stats_key(job_id), mapping={str(i): json.dumps(c[2]) for i, c in committed.items()})
        pipe.zadd(k.JOBS_INDEX_KEY, {job_id: created_at})
        pipe.execute()

    def set_state(self, job_id: str, state: JobState, reason: str = "", lease: Lease | None = None,
                  publication: Publication | None = None) -> bool:
        """Record the job's state unless it has ended (only `retry` reopens a job), a `lease` is stale,
        or someone else is publishing the job; False when refused. An ended job frees its output
        prefix and its keys start to expire."""
        output = _text(self.r.hget(k.job_key(job_id), "output") or "")
        reply = self.r.eval(
            fencing.SET_STATE, 3 + len(k.job_keys(job_id)), k.job_key(job_id), k.shard_lease_key(job_id),
            k.output_lease_key(output), *k.job_keys(job_id),
            state.value, reason, "", "1" if state.terminal else "", self.job_ttl_s,
            "" if lease is None else str(lease.shard), "" if lease is None else str(lease.token),
            "" if publication is None else publication.claimer, job_id, k.job_state_channel(job_id),
            fencing.PUBLISH_CLAIM_S)
        return reply == "ok"  # waiters are told in the same script: they then read a settled job

    def claim_publication(self, job_id: str) -> Publication | None:
        """Claim the right to publish the job's record; None when it has ended, has unsettled shards,
        or another publisher is at it (see fencing.py)."""
        output = _text(self.r.hget(k.job_key(job_id), "output") or "")
        claimer = secrets.token_hex(8)
        reply = self.r.eval(fencing.CLAIM_PUBLICATION, 3, k.job_key(job_id), k.shard_state_key(job_id),
                            k.output_lease_key(output), claimer, "", fencing.PUBLISH_CLAIM_S)
        if reply[0] != "ok":
            return None
        return Publication(job_id, claimer, float(reply[1]), reply[2])

    def release_publication(self, publication: Publication) -> None:
        self.r.eval(fencing.RELEASE_PUBLICATION, 1, k.job_key(publication.job_id), publication.claimer)

    @contextmanager
    def state_changes(self, job_id: str) -> Iterator[Callable[[float], None]]:
        """A `pause(seconds)` that returns early when the job's state is recorded. Subscribed
        before the caller reads the job, so no change between the read and the pause is missed."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(k.job_state_channel(job_id))
            pubsub.get_message(timeout=5)  # the subscription's own reply: the first pause is then a real one
        except redis.RedisError:
            pass  # Redis is restarting: pauses poll until it is back (the client resubscribes on reconnect)

        def pause(seconds: float) -> None:
            try:
                pubsub.get_message(timeout=seconds)
            except redis.RedisError:  # Redis is restarting: pause as a poll would; the caller's next read tells
                time.sleep(seconds)

        try:
            yield pause
        finally:
            pubsub.close()

    # -- worker side -----------------------------------------------------------------------
    def spec_json(self, job_id: str) -> str:
        spec = self.r.hget(k.job_key(job_id), "spec")
        if spec is None:
            raise JobNotFound(self._missing(job_id))
        return _text(spec)

    def state(self, job_id: str) -> JobState:
        value = self.r.hget(k.job_key(job_id), "state")
        if value is None:
            raise JobNotFound(self._missing(job_id))
        return JobState(value)

    def start_shard(self, job_id: str, shard: int, count: bool = True) -> Lease:
        """Grant a delivery of the shard its lease (fencing off any earlier one); with `count`, the
        delivery counts towards quarantine and the shard becomes running. StaleDelivery when the
        job has ended."""
        token, attempts = self.r.eval(
            fencing.GRANT, 6, k.job_key(job_id), k.shard_state_key(job_id), k.shard_attempts_key(job_id),
            k.shard_lease_key(job_id), k.shard_heartbeat_key(job_id), k.shard_advanced_key(job_id),
            str(shard), "1" if count else "")
        if not token:
            state = _text(self.r.hget(k.job_key(job_id), "state") or "")
            raise StaleDelivery(f"job {job_id} has ended ({state}): shard {shard} is not run", state)
        return Lease(job_id, shard, int(token), int(attempts))

    def _fenced(self, script: str, lease: Lease, keys: list[str], *args) -> str:
        """Run a fenced write; StaleDelivery (with the job's state when it has ended) when refused."""
        job_id = lease.job_id
        reply = self.r.eval(script, 2 + len(keys), k.job_key(job_id), k.shard_lease_key(job_id), *keys,
                            str(lease.shard), str(lease.token), *args)
        if reply == "stale":
            raise StaleDelivery(f"job {job_id} shard {lease.shard}: lease {lease.token} was handed to a later "
                                "delivery; this one writes nothing more")
        if reply.startswith("ended:"):
            state = reply.split(":", 1)[1]
            raise StaleDelivery(f"job {job_id} has ended ({state}); shard {lease.shard} writes nothing more", state)
        return reply

    def progress(self, lease: Lease, done: int) -> None:
        """Items the delivery has done so far: the count only grows (a late write cannot lower it)."""
        self._fenced(fencing.PROGRESS, lease, [k.shard_state_key(lease.job_id), k.shard_done_key(lease.job_id),
                                               k.shard_advanced_key(lease.job_id)], done)

    def _job_field(self, job_id: str, op: str, name: str, value: int | str) -> int:
        """HINCRBY (`op` 'incr') or HSET ('set') one field of a recorded job; JobNotFound when Redis
        no longer holds the job (the hash is never recreated as a fragment)."""
        reply = self.r.eval(_JOB_FIELD_WRITE, 1, k.job_key(job_id), op, name, value)
        if reply is None:
            raise JobNotFound(self._missing(job_id))
        return int(reply)

    def set_queue(self, job_id: str, queue: str) -> None:
        self._job_field(job_id, "set", "queue", queue)

    def queue(self, job_id: str) -> str:
        return _text(self.r.hget(k.job_key(job_id), "queue") or k.QUEUE_DEFAULT)

    def shard_items(self, job_id: str, shard: int, n_items: int) -> None:
        """Items found inside a .tar shard (unknown when the job was planned)."""
        self.r.hset(k.shard_items_key(job_id), str(shard), n_items)

    def set_total(self, job_id: str, n_items: int) -> None:
        self._job_field(job_id, "set", "n_items", n_items)

    def heartbeat(self, lease: Lease) -> None:
        self._fenced(fencing.HEARTBEAT, lease, [k.shard_state_key(lease.job_id), k.shard_heartbeat_key(lease.job_id)])

    def hold_for(self, lease: Lease, seconds: float) -> None:
        """A failed delivery waits out its retry backoff: the reconciler leaves the shard alone that long."""
        self._fenced(fencing.HOLD, lease, [k.shard_heartbeat_key(lease.job_id)], seconds)

    def stand_down(self, lease: Lease) -> None:
        """A delivery stopped without committing (the job was cancelled): the shard is pending again."""
        self._fenced(fencing.STAND_DOWN, lease, [k.shard_state_key(lease.job_id), k.shard_heartbeat_key(lease.job_id)])

    def now(self) -> float:
        """Redis's clock (TIME), in seconds: heartbeats and grants are stamped with it, so their ages
        are measured against it, never against this host's clock."""
        seconds, micros = cast(tuple[int, int], self.r.time())
        return seconds + micros / 1e6

    def heartbeats(self, job_id: str) -> dict[int, float]:
        return {int(i): float(t) for i, t in self.r.hgetall(k.shard_heartbeat_key(job_id)).items()}

    def mark_enqueued(self, job_id: str, shards: list[int]) -> None:
        if shards:
            now = self.now()
            self.r.hset(k.shard_enqueued_key(job_id), mapping={str(s): now for s in shards})

    def lost_pending(self, job_id: str, older_than: float) -> list[int]:
        """Pending shards sent before `older_than` whose message is neither queued nor freshly
        taken: it was lost (kombu moves a message from the queue to its unacked set in two steps;
        a crash between them drops it), or the worker that took it before `older_than` died
        before starting the shard. A message taken since is a worker's that is still starting
        the shard (reading the job, creating its clients): left to it."""
        if self.r.llen(self.queue(job_id)):
            return []
        sent = {int(i): float(t) for i, t in self.r.hgetall(k.shard_enqueued_key(job_id)).items()}
        pending = [i for i, s in self.shard_states(job_id).items()
                   if s is ShardState.PENDING and sent.get(i, 0) < older_than]
        if not pending:
            return []
        held = self._task_ids_taken_since(older_than)
        return [i for i in pending if k.shard_task_id(job_id, i) not in held]

    def _task_ids_taken_since(self, since: float) -> set[str]:
        """Task ids of the messages workers took (kombu's unacked set) at `since` or later."""
        tags = _texts(self.r.zrangebyscore(k.KOMBU_UNACKED_INDEX_KEY, since, "+inf"))
        if not tags:
            return set()
        ids = set()
        for raw in self.r.hmget(k.KOMBU_UNACKED_KEY, tags):
            if raw is None:
                continue  # gone meanwhile: it holds no shard
            try:
                ids.add(json.loads(raw)[0]["headers"]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # gone meanwhile, or not a Celery task message: it holds no shard
        return ids

    def count_requeues(self, job_id: str, n: int) -> None:
        self._job_field(job_id, "incr", "requeued", n)

    def count_reconcile_error(self, job_id: str) -> int:
        """A reconciler pass over the job raised: counted fleet-wide (the exporter shows it); returns
        how many passes over this job have raised in a row. JobNotFound when Redis no longer holds it."""
        passes = self._job_field(job_id, "incr", "reconcile_errors", 1)
        self.r.incr(k.RECONCILE_ERRORS_KEY)
        return passes

    def count_oom_refusals(self, n: int) -> None:
        """Writes Redis refused at maxmemory that a caller rode out (redisretry.py): counted fleet-wide,
        once Redis takes writes again. Best effort: a statistic never fails the caller's work."""
        try:
            self.r.incrby(k.REDIS_OOM_REFUSALS_KEY, n)
        except redis.RedisError:
            pass  # full or gone again: the next ridden-out refusal is counted with its own

    def oom_refusals_total(self) -> int:
        return int(self.r.get(k.REDIS_OOM_REFUSALS_KEY) or 0)

    def clear_reconcile_errors(self, job_id: str) -> None:
        self.r.hdel(k.job_key(job_id), "reconcile_errors")

    def reconcile_errors_total(self) -> int:
        return int(self.r.get(k.RECONCILE_ERRORS_KEY) or 0)

    def requeue_if_stale(self, job_id: str, shard: int, stale_after_s: float, stall_after_s: float = 0.0) -> str:
        """Atomically move a running shard back to pending, fencing off its holder: "silent" when it
        has not heartbeaten for `stale_after_s`, "stalled" when (`stall_after_s` > 0) it heartbeats
        but has not advanced for `stall_after_s`; "" when neither. Ages by Redis's clock."""
        return self.r.eval(fencing.REQUEUE, 4, k.shard_state_key(job_id), k.shard_heartbeat_key(job_id),
                           k.shard_advanced_key(job_id), k.shard_lease_key(job_id),
                           str(shard), stale_after_s, stall_after_s) or ""

    def record_commit(self, lease: Lease, done: int, errors: int, stats: dict) -> bool:
        """Record the delivery's committed shard; True when every shard is now committed or failed.
        StaleDelivery when another delivery holds the shard or the job has ended."""
        job_id = lease.job_id
        keys = [k.shard_state_key(job_id), k.shard_heartbeat_key(job_id), k.shard_done_key(job_id),
                k.shard_errors_key(job_id), k.shard_stats_key(job_id), k.shard_reason_key(job_id)]
        return self._fenced(fencing.COMMIT, lease, keys, done, errors, json.dumps(stats)) == "ok:1"

    def fail_shard(self, lease: Lease, reason: str) -> bool:
        """Quarantine the delivery's shard with its reason; True when every shard is now settled."""
        keys = [k.shard_state_key(lease.job_id), k.shard_reason_key(lease.job_id)]
        return self._fenced(fencing.FAIL_SHARD, lease, keys, reason) == "ok:1"

    def note_shard_error(self, job_id: str, shard: int, reason: str) -> None:
        self.r.hset(k.shard_last_error_key(job_id), str(shard), reason[:2000])

    def last_shard_error(self, job_id: str, shard: int) -> str:
        return _text(self.r.hget(k.shard_last_error_key(job_id), str(shard)) or "")

    def all_settled(self, job_id: str) -> bool:
        states = self.r.hvals(k.shard_state_key(job_id))
        return all(s in (ShardState.COMMITTED.value, ShardState.FAILED.value) for s in states)

    def shard_states(self, job_id: str) -> dict[int, ShardState]:
        return {int(i): ShardState(s) for i, s in self.r.hgetall(k.shard_state_key(job_id)).items()}

    def shard_stats(self, job_id: str) -> dict[int, dict]:
        return {int(i): json.loads(s) for i, s in self.r.hgetall(k.shard_stats_key(job_id)).items()}

    def reset_shards(self, job_id: str, shards: list[int]) -> None:
        """Make shards pending again (for `retry`), forgetting their attempts."""
        if not shards:
            return
        pipe = self.r.pipeline(transaction=True)
        for shard in shards:
            pipe.hset(k.shard_state_key(job_id), str(shard), ShardState.PENDING.value)
            pipe.hdel(k.shard_attempts_key(job_id), str(shard))
            pipe.hdel(k.shard_reason_key(job_id), str(shard))
            pipe.hincrby(k.shard_lease_key(job_id), str(shard), 1)  # deliveries from before the retry are stale
        pipe.hset(k.job_key(job_id), mapping={"state": JobState.QUEUED.value, "reason": "", "finished_at": 0})
        pipe.hdel(k.job_key(job_id), "publisher", "publish_claimed_at", "publish_finished_at")  # published anew
        for key in k.job_keys(job_id):
            pipe.persist(key)  # running again: no longer expiring
        pipe.execute()

    # -- reading ---------------------------------------------------------------------------
    def _missing(self, job_id: str) -> str:
        """Why a job is not in Redis: never submitted here, or finished and expired (ids start with their time)."""
        try:
            submitted = calendar.timegm(time.strptime(job_id[:15], "%Y%m%d-%H%M%S"))
        except ValueError:
            submitted = None
        if submitted is not None and time.time() - submitted > self.job_ttl_s:
            return (f"job {job_id} ended more than {self.job_ttl_s / 86400:g} days ago and its state expired from "
                    f"Redis (VITBATCH_JOB_TTL_S); its output's {k.SUCCESS_FILE} (or {k.FAILURES_FILE}) holds its record")
        return (f"no job {job_id!r} in Redis; check the id and VITBATCH_BROKER_URL (if Redis lost its data, "
                f"`vitbatch recover <output>` rebuilds the job from its output's records)")

    def status(self, job_id: str) -> JobStatus:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(k.job_key(job_id))
        pipe.hvals(k.shard_state_key(job_id))
        pipe.hvals(k.shard_done_key(job_id))
        pipe.hvals(k.shard_errors_key(job_id))
        pipe.hgetall(k.shard_reason_key(job_id))
        pipe.hvals(k.shard_items_key(job_id))
        job, states, done, errors, reasons, tar_items = pipe.execute()
        if "state" not in job:  # none, or a fragment a pass before this release left after Redis lost the job
            raise JobNotFound(self._missing(job_id))
        counts = {s.value: 0 for s in ShardState}
        for s in states:
            counts[s] += 1
        return JobStatus(
            job_id=job_id, kind=job.get("kind", ""), state=JobState(job["state"]), output=job["output"],
            n_items=int(job["n_items"]) + sum(int(x) for x in tar_items), n_shards=int(job["n_shards"]),
            done=sum(int(x) for x in done), errors=sum(int(x) for x in errors), shards=counts,
            failed_shards={int(i): r for i, r in reasons.items()}, reason=job.get("reason", ""),
            requeued=int(job.get("requeued") or 0), carried=int(job.get("carried") or 0),
            created_at=float(job["created_at"]), finished_at=float(job.get("finished_at") or 0),
        )

    def active_jobs(self, limit: int = 1000) -> list[str]:
        jobs = self.recent_jobs(limit)
        pipe = self.r.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(k.job_key(job_id), "state")
        return [j for j, s in zip(jobs, pipe.execute()) if s in (JobState.QUEUED.value, JobState.RUNNING.value)]

    def recent_jobs(self, limit: int = 20) -> list[str]:
        return list(_texts(self.r.zrevrange(k.JOBS_INDEX_KEY, 0, limit - 1)))
