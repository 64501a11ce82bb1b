"""`vitbatch metrics`: the fleet exporter, one per deployment, reading Redis on every scrape.

Workers only know their own shards; how much waits in each lane and how far each job has
got lives in Redis (the broker's lists and the ledger), so one process reads it there. It is
a custom collector: nothing is cached between scrapes, so a job's series vanish with the job.
"""

from __future__ import annotations

import time

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE, QUEUE_TRAIN, job_key
from orchestrator.errors import JobNotFound
from orchestrator.fleet.redisretry import ride_out
from orchestrator.lifecycle.ledger import Ledger
from orchestrator.lifecycle.states import JobState, ShardState

QUEUES = (QUEUE_INTERACTIVE, QUEUE_DEFAULT, QUEUE_TRAIN)
JOB_LABELS = ["job", "kind"]
JOBS_COUNTED = 1000  # the newest jobs in the index that vitbatch_jobs counts by state
SCRAPE_RETRY_S = 5.0  # a scrape rides out a Redis restart this long (Prometheus times out at 10 s)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in: the queue's name, plus one per message priority step."""
    return [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


def queue_lengths(client: redis.Redis) -> dict[str, int]:
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for key in queue_keys(queue):
            pipe.llen(key)
    lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in queue_keys(queue)) for queue in QUEUES}


def job_state_counts(ledger: Ledger, limit: int = JOBS_COUNTED) -> dict[str, int]:
    jobs = ledger.recent_jobs(limit)
    pipe = ledger.r.pipeline(transaction=False)
    for job_id in jobs:
        pipe.hget(job_key(job_id), "state")
    counts = {state.value: 0 for state in JobState}
    for state in pipe.execute():
        if state in counts:
            counts[state] += 1
    return counts


def heartbeat_age(ledger: Ledger, job_id: str) -> float:
    """Age of the oldest heartbeat among the job's running shards (a retry's hold in the future counts 0)."""
    states, beats, now = ledger.shard_states(job_id), ledger.heartbeats(job_id), ledger.now()  # Redis's clock
    running = [shard for shard, state in states.items() if state is ShardState.RUNNING]
    return max((max(0.0, now - beats.get(shard, now)) for shard in running), default=0.0)


class FleetCollector:
    """Queue length per lane, jobs per state, and per active job: progress, errors, rate, ETA."""

    def __init__(self, ledger: Ledger, retry_s: float = SCRAPE_RETRY_S) -> None:
        self.ledger, self.retry_s = ledger, retry_s

    @staticmethod
    def families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        def job(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc + " (active jobs only; the series ends with the job).", labels=JOB_LABELS)

        return {f.name: f for f in (
            GaugeMetricFamily("vitbatch_up", "1 when this scrape could read Redis, else 0."),
            GaugeMetricFamily("vitbatch_queue_length", "Messages waiting in a lane's Redis lists (not yet delivered).",
                              labels=["queue"]),
            GaugeMetricFamily("vitbatch_unacked_messages", "Messages delivered to a worker and not yet acknowledged "
                              "(shards in flight, every lane)."),
            GaugeMetricFamily("vitbatch_jobs", f"Jobs per state among the newest {JOBS_COUNTED} in Redis.",
                              labels=["state"]),
            job("vitbatch_job_items_done", "Items a job has finished (error rows included)"),
            job("vitbatch_job_items_total", "Items a job holds"),
            job("vitbatch_job_errors", "Error rows a job has written"),
            job("vitbatch_job_quarantined_shards", "Shards a job gave up on after too many deliveries"),
            job("vitbatch_job_images_per_second", "A job's items done per second since it was submitted"),
            job("vitbatch_job_eta_seconds", "Seconds until a job is done at its rate so far"),
            job("vitbatch_job_heartbeat_age_seconds", "Seconds since the most silent running shard of a job "
                "last heartbeat (0 with none running); past VITBATCH_STALE_AFTER_S the reconciler re-enqueues it"),
            CounterMetricFamily("vitbatch_reconcile_errors", "Reconciler passes over one job that raised (the job "
                                "is passed over; after VITBATCH_RECONCILE_MAX_ERRORS in a row it is marked failed)."),
            CounterMetricFamily("vitbatch_redis_oom_refusals", "Writes Redis refused at maxmemory that a client or "
                                "the reconciler rode out and retried (counted once Redis takes writes again)."),
        )}

    def describe(self):
        """The families without samples: lets the registry check names without reading Redis."""
        return list(self.families().values())

    def collect(self):
        try:
            families = ride_out(self._filled, self.retry_s, "Redis (fleet exporter)", counted=self.ledger.count_oom_refusals)
            families["vitbatch_up"].add_metric([], 1)
        except redis.RedisError:
            families = {"vitbatch_up": self.families()["vitbatch_up"]}
            families["vitbatch_up"].add_metric([], 0)
        return list(families.values())

    def _filled(self) -> dict:
        families = self.families()
        self._fill(families)
        return families

    def _fill(self, families: dict) -> None:
        for queue, length in queue_lengths(self.ledger.r).items():
            families["vitbatch_queue_length"].add_metric([queue], length)
        families["vitbatch_unacked_messages"].add_metric([], self.ledger.r.hlen(Channel.unacked_key))
        families["vitbatch_reconcile_errors"].add_metric([], self.ledger.reconcile_errors_total())
        families["vitbatch_redis_oom_refusals"].add_metric([], self.ledger.oom_refusals_total())
        for state, count in job_state_counts(self.ledger).items():
            families["vitbatch_jobs"].add_metric([state], count)
        for job_id in self.ledger.active_jobs():
            try:
                status = self.ledger.status(job_id)
            except JobNotFound:
                continue  # expired between the two reads
            labels = [job_id, status.kind]
            families["vitbatch_job_items_done"].add_metric(labels, status.done)
            families["vitbatch_job_items_total"].add_metric(labels, status.n_items)
            families["vitbatch_job_errors"].add_metric(labels, status.errors)
            families["vitbatch_job_quarantined_shards"].add_metric(labels, status.shards.get("failed", 0))
            families["vitbatch_job_images_per_second"].add_metric(labels, status.images_per_s)
            if status.eta_s is not None:
                families["vitbatch_job_eta_seconds"].add_metric(labels, status.eta_s)
            families["vitbatch_job_heartbeat_age_seconds"].add_metric(labels, heartbeat_age(self.ledger, job_id))


def registry(ledger: Ledger) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FleetCollector(ledger))
    return reg


def serve(ledger: Ledger, port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics on port until interrupted (the HTTP server runs in a daemon thread)."""
    start_http_server(port, addr=address, registry=registry(ledger))
    while True:
        time.sleep(3600)
