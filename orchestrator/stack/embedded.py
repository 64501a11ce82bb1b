"""The embedded stack: a private Redis-compatible server, local workers and Flower.

Same code path as a cluster: real Redis protocol, real Celery workers in their
own processes, the local directory as the object store. Used by `vitbatch run`
when no broker is configured, by `vitbatch up`, and by the test fixtures.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.stack.gpupool import listed_gpus
from orchestrator.stack.processes import (
    ALL_QUEUES,
    RedisServer,
    flower_command,
    flower_env,
    free_port,
    settings_env,
    worker_command,
)

MAX_AUTO_WORKERS = 4


def auto_workers() -> int:
    """Local workers when none are asked for: one on a GPU host (its GPU is the limit); on a CPU
    host one per core, up to four, each with one compute thread. In one process the reader and
    decode threads and the model fight over the GIL; in two solo processes on two cores they do
    not (bench/peers.py: 2,000 JPEGs, ViT-Tiny, 103 s with one worker, 80 s with two)."""
    if listed_gpus():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))


@dataclass
class EmbeddedStack:
    """Context manager; `settings` inside it point at the private Redis."""

    workers: int = 1
    flower: bool = False
    data_dir: Path | None = None
    settings: Settings = field(default_factory=Settings)
    processes: list[subprocess.Popen] = field(default_factory=list)
    flower_url: str = ""
    metrics_urls: list[str] = field(default_factory=list)  # one per worker when settings.metrics_port is set
    stop_requested: threading.Event = field(default_factory=threading.Event)  # set by SIGTERM
    _signalled: set[int] = field(default_factory=set)

    def __enter__(self) -> EmbeddedStack:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (docker stop, systemd, kill) unwinds like Ctrl-C, so __exit__ stops the
            # workers and Redis instead of leaving them behind.
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.data_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="vitbatch-")
            root = Path(self._tmp.name)
        else:
            self._tmp = None
            root = Path(self.data_dir)
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(root / "redis", password=secrets.token_hex(8)).start()
        self.settings = self.settings.model_copy(update={"broker_url": self.redis.url(), "result_backend": None})
        try:
            for index in range(self.workers):
                self.start_worker(f"vitbatch-embedded-{index}")
            if self.flower:
                port = free_port()
                self._spawn(flower_command(port), "flower", flower_env(
                    self.redis.url(), self.settings.flower_user, self.settings.flower_password))
                self.flower_url = f"http://127.0.0.1:{port}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _on_sigterm(self, _signum, _frame) -> None:
        # Python runs a handler between any two bytecodes, a finalizer's (`__del__`) among them,
        # and only prints an exception raised there: an interrupt can be lost, the event is not.
        # The stack's loops (`serve`, `Client.wait(stop=...)`) check it.
        self.stop_requested.set()
        raise KeyboardInterrupt

    def serve(self, tick: Callable[[], object], every_s: float) -> list[int]:
        """Call tick every every_s seconds until a worker exits (their pids are returned) or
        SIGTERM asks the stack to stop ([])."""
        while not self.dead_workers():
            tick()
            if self.stop_requested.wait(every_s):
                return []
        return self.dead_workers()

    def _spawn(self, cmd: list[str], log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**settings_env(self.settings), **(extra_env or {})}
        with open(self.log_dir / f"{log_name}.log", "ab") as log:  # the child holds its own copy
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def start_worker(self, name: str) -> subprocess.Popen:
        # Local workers share this host's cores: without a cap each one's torch/OpenMP spins up a
        # thread per core and they thrash (training ran 2.8x slower here with 2 workers on 2 cores).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, self.workers)))
        env = {"OMP_NUM_THREADS": threads} if "OMP_NUM_THREADS" not in os.environ else {}
        return self._spawn(worker_command(name, queues=ALL_QUEUES), name, {**env, **self._metrics_env()})

    def _metrics_env(self) -> dict[str, str]:
        """Worker N of the stack serves its metrics on the base port plus N, on loopback."""
        base = self.settings.metrics_port
        if not base:
            return {}
        port = base + len(self.metrics_urls)
        self.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
        return {"VITBATCH_METRICS_PORT": str(port), "VITBATCH_METRICS_ADDRESS": "127.0.0.1"}

    def begin_shutdown(self) -> None:
        """SIGTERM every process now (a warm shutdown); __exit__ then only waits. A caller whose
        job has ended sends it before printing the results, so the workers leave meanwhile."""
        for proc in self.processes:
            if proc.poll() is None and proc.pid not in self._signalled:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: the running shard finishes or is returned
                self._signalled.add(proc.pid)  # once: a second SIGTERM is not sent on exit

    def discard(self) -> None:
        """Stop every process at once (SIGKILL to each one's process group), for a stack whose
        job has succeeded: its output is published, no shard runs (decode slots are released at
        each shard's end), and the broker and logs go with the stack, so a warm shutdown would
        only hand messages back to a Redis about to be deleted. It would cost about 1.5 s: up
        to a second for Celery's event loop to notice the signal, then the interpreter's exit."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it left meanwhile
                    os.killpg(proc.pid, signal.SIGKILL)
                self._signalled.add(proc.pid)

    def dead_workers(self) -> list[int]:
        return [p.pid for p in self.processes if p.poll() is not None]

    def __exit__(self, *exc) -> None:
        self.begin_shutdown()
        deadline = time.monotonic() + 15
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.redis.stop()
        if getattr(self, "_previous_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self._tmp:
            self._tmp.cleanup()
