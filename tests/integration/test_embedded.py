"""The embedded stack as `vitbatch up` runs it: private Redis, Flower with auth."""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from orchestrator.config import Settings
from orchestrator.stack.embedded import EmbeddedStack

pytestmark = pytest.mark.integration


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _get(url)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def test_flower_refuses_requests_without_credentials():
    settings = Settings(flower_user="ops", flower_password="s3cret-flower")
    with EmbeddedStack(workers=0, flower=True, settings=settings) as stack:
        _wait_for_http(stack.flower_url + "/api/workers")
        assert _get(stack.flower_url + "/api/workers") == 401
        assert _get(stack.flower_url + "/api/workers", ("ops", "wrong")) == 401
        assert _get(stack.flower_url + "/api/workers", ("ops", "s3cret-flower")) == 200


def test_embedded_redis_requires_its_password():
    import redis

    with EmbeddedStack(workers=0) as stack:
        url = stack.settings.broker_url
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=stack.redis.port).ping()


def test_sigterm_to_vitbatch_up_stops_its_redis_and_workers(env, tmp_path):
    """docker stop and systemd send SIGTERM: the stack's children must not outlive it."""
    import signal
    import subprocess
    import sys

    import psutil
    from support import ROOT

    up_env = {k: v for k, v in env.items() if k != "VITBATCH_BROKER_URL"}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.commands.cli", "up", "--workers", "1"], env=up_env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "Ctrl-C stops the stack" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3, log.read_text()  # Redis, a worker, Flower
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        left = [p.cmdline()[:3] for p in alive]
        assert not alive, f"left running after SIGTERM: {left}"
    finally:  # a failure must not leave the stack running under later tests
        proc.kill()  # a no-op once it has exited
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_vitbatch_run_without_a_broker_starts_one_worker_per_core_and_a_rerun_needs_overwrite(tiny_model, tmp_path):
    """The README's one-off command: no VITBATCH_BROKER_URL, so a private stack for the job."""
    import json
    import os

    from support import run_cli

    from orchestrator.stack.demo import write_digits
    from orchestrator.stack.embedded import auto_workers

    write_digits(tmp_path / "in", limit=40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}
    env["VITBATCH_MODEL_CACHE_DIR"] = str(tmp_path / "cache")
    args = ["run", "classify", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", str(tiny_model), "--shard-size", "20"]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stderr
    assert f"starting the embedded stack with {auto_workers()} worker(s)" in first.stderr
    record = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert record["processed"] == 40 and record["errors"] == 0 and len(record["parts"]) == 2
    assert not _processes_with(env["VITBATCH_MODEL_CACHE_DIR"])  # the stack's workers left with the command
    again = run_cli(args, env)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text()) == record  # nothing was touched


def _processes_with(cache_dir: str) -> list[list[str]]:
    """Command lines of processes whose environment names this model cache (the stack's children)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("VITBATCH_MODEL_CACHE_DIR") == cache_dir:
                found.append(proc.cmdline()[:4])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_a_succeeded_run_leaves_no_process_behind_not_even_decode_processes(tiny_model, tmp_path):
    """After a succeeded job `vitbatch run` kills its stack instead of waiting for a warm
    shutdown: nothing of it may outlive the command, the workers' decode processes included."""
    from support import run_cli

    from orchestrator.stack.demo import write_digits

    write_digits(tmp_path / "in", limit=12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}
    env["VITBATCH_MODEL_CACHE_DIR"] = str(tmp_path / "cache")
    result = run_cli(["run", "classify", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "--model", str(tiny_model), "--decode", "processes", "--workers", "1"], env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS.json").exists()
    assert not _processes_with(env["VITBATCH_MODEL_CACHE_DIR"])


def test_auto_workers_is_one_per_core_up_to_four_and_one_on_a_gpu_host(monkeypatch):
    import orchestrator.stack.embedded as embedded

    monkeypatch.setattr(embedded, "listed_gpus", lambda: [])
    for cores, expected in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(embedded.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert embedded.auto_workers() == expected
    monkeypatch.setattr(embedded, "listed_gpus", lambda: ["0", "1"])
    assert embedded.auto_workers() == 1
