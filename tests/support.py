"""Test support shared by every test folder (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from orchestrator.processes import ALL_QUEUES, worker_command

ROOT = Path(__file__).resolve().parents[1]


class WorkerPool:
    """Real `celery -A workers worker` processes, started, stopped and killed by tests."""

    def __init__(self, env: dict[str, str], log_dir: Path, app) -> None:
        self.env, self.log_dir, self.app = env, log_dir, app
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, pool: str = "solo", wait: bool = True,
              env: dict[str, str] | None = None, shards_in_flight: int = 1) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(worker_command(name, queues=ALL_QUEUES, shards_in_flight=shards_in_flight, pool=pool),
                                    env={**self.env, **(env or {})}, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def wait_ready(self, name: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"worker {name} exited: {self.log(name)[-3000:]}")
            replies = self.app.control.ping(timeout=0.5) or []
            if any(name in key for reply in replies for key in reply):
                return
        raise RuntimeError(f"worker {name} not ready after {timeout_s} s: {self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log")))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop(self, name: str, timeout_s: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not leave in time."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
