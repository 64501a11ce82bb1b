"""Test support shared by every test folder (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.stack.processes import ALL_QUEUES, worker_command

ROOT = Path(__file__).resolve().parents[1]


def build_tiny_vit(dest: Path, num_labels: int = 10, image_size: int | tuple[int, int] = 32, seed: int = 0, *,
                   labels: list[str] | None = None, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                   head_scale: float = 1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   resample: int | None = None) -> Path:
    """A small untrained HF ViT (4x4 patches) with its image processor, saved as safetensors (what `--model` loads).

    `labels` name the classes (default "0".."num_labels-1"); `image_size` may be (height, width).
    `head_scale` > 1 spreads the near-uniform scores of a random init, so that argmax
    comparisons are not decided by rounding.
    """
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = labels or [str(i) for i in range(num_labels)]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size if isinstance(image_size, int) else [height, width], patch_size=4,
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden_size,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.classifier.weight.mul_(head_scale)
    model.save_pretrained(dest)
    extra = {} if resample is None else {"resample": Image.Resampling(resample)}
    ViTImageProcessor(size={"height": height, "width": width}, image_mean=list(mean), image_std=list(std),
                      **extra).save_pretrained(dest)
    return dest


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    """`vitbatch ARGS` in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


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
