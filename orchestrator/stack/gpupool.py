"""`vitbatch worker --gpus all`: one worker process per visible GPU, each pinned with
CUDA_VISIBLE_DEVICES and named after its GPU, supervised until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from orchestrator.errors import VitbatchError

RESTART_BACKOFF_S = 5.0


def visible_gpus(spec: str) -> list[str]:
    """'all' -> every GPU nvidia-smi lists (or CUDA_VISIBLE_DEVICES names); '0,2' -> those ids."""
    available = listed_gpus()
    if spec == "all":
        chosen = available
    else:
        chosen = [g.strip() for g in spec.split(",") if g.strip()]
        missing = [g for g in chosen if g not in available]
        if missing:
            raise VitbatchError(f"GPU(s) {missing} are not visible; visible: {available}")
    if not chosen:
        raise VitbatchError("no GPUs visible (nvidia-smi lists none): run `vitbatch worker` without --gpus on a CPU host")
    return chosen


def listed_gpus() -> list[str]:
    """GPU ids from CUDA_VISIBLE_DEVICES, else from nvidia-smi; [] on a CPU-only host (no torch needed)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def metrics_port(base: int, gpu: str, position: int) -> int:
    """A GPU process's Prometheus port: the base plus the GPU's index (its position when ids are UUIDs)."""
    return base + (int(gpu) if gpu.isdigit() else position)


def supervise(gpus: list[str], command_for, metrics_base: int = 0) -> int:
    """Run command_for(gpu) per GPU; restart a crashed one; forward SIGTERM/SIGINT (warm shutdown).

    metrics_base: VITBATCH_METRICS_PORT of the pool; each GPU process gets its own port (metrics_port).
    """
    procs: dict[str, subprocess.Popen] = {}
    stopping = {"flag": False}

    # Each GPU's decode processes get their share of the host's cores, not all of them.
    share = str(max(1, len(os.sched_getaffinity(0)) // len(gpus)))

    def spawn(gpu: str) -> None:
        env = {"VITBATCH_DECODE_PROCESSES": share, **os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        if metrics_base:
            env["VITBATCH_METRICS_PORT"] = str(metrics_port(metrics_base, gpu, gpus.index(gpu)))
        procs[gpu] = subprocess.Popen(command_for(gpu), env=env)

    def stop(signum, _frame) -> None:
        stopping["flag"] = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for gpu in gpus:
        spawn(gpu)
    while True:
        time.sleep(1)
        if stopping["flag"]:
            return max((p.wait() for p in procs.values()), default=0)
        for gpu, proc in list(procs.items()):
            if proc.poll() is not None:
                print(f"worker for GPU {gpu} exited with {proc.returncode}; restarting in {RESTART_BACKOFF_S} s", flush=True)
                time.sleep(RESTART_BACKOFF_S)
                spawn(gpu)
