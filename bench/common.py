"""Shared bench fixtures: real photos as 500x375 JPEGs, and ViTs built locally (no hub)."""

from __future__ import annotations

import json
import os
import platform
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from orchestrator.lifecycle.commits import ShardMarker


def write_photo_jpegs(dest: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """n distinct 500x375 JPEGs cut from scikit-learn's two sample photos (real images, shipped offline)."""
    from sklearn.datasets import load_sample_images

    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.55, 0.95)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        crop = photo.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        path = dest / f"img-{i:06d}.jpg"
        crop.save(path, quality=rng.randint(80, 95))
        paths.append(path)
    return paths


def build_hf_vit(dest: Path, *, hidden: int, layers: int, heads: int, image_size: int = 224, patch: int = 16,
                 num_labels: int = 10, seed: int = 0) -> Path:
    """A randomly initialized HF ViT with its image processor (ViT-Tiny/16: 192, 12, 3).

    The classifier is scaled up so that random weights still give decisive top-1 margins
    on many images (with the default init every image is a near-tie and agreement is noise).
    """
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if (dest / "config.json").exists():
        return dest
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=num_labels,
                       id2label={i: f"class-{i}" for i in range(num_labels)},
                       label2id={f"class-{i}": i for i in range(num_labels)})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)
    model.save_pretrained(dest)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(dest)
    return dest


@contextmanager
def timed(label: str, results: dict):
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start


def cpu_info() -> dict:
    """The CPU model, the flags that decide bf16 and int8 speed, and which kind of CPU this is."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    fast_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    return {"cpu": model, "flags": sorted(f for f in wanted if f in flags), "amx_or_avx512_bf16": fast_bf16,
            "cpu_kind": cpu_kind(flags)}


def cpu_kind(flags: set[str]) -> str:
    """Which of the three CPU kinds this project meets: they decide what `--precision auto` does."""
    if "amx_bf16" in flags:
        return "Intel AMX (auto = bf16)"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16 without AMX (auto = bf16)"
    return "AVX2-only (bf16 emulated; auto = fp32)"


def report(name: str, figures: dict) -> None:
    """Print one JSON line per benchmark so RESULTS.md can quote it verbatim (with the CPU it ran on)."""
    print(json.dumps({"bench": name, "cpus": os.cpu_count(), **cpu_info(), **figures}, default=float))


def bench_dir() -> Path:
    return Path(os.environ.get("VITBATCH_BENCH_DIR", Path.home() / ".cache" / "vitbatch" / "bench"))


VIT_TINY = {"hidden": 192, "layers": 12, "heads": 3}
VIT_BASE = {"hidden": 768, "layers": 12, "heads": 12}


def photos_and_vit(n: int, vit: dict = VIT_TINY) -> tuple[Path, list[Path], Path]:
    """(image folder, its n 500x375 JPEGs, a ViT/16 at 224 directory), cached under bench_dir()."""
    root = bench_dir()
    image_dir = root / f"jpegs-500x375-{n}"
    name = f"vit-{'tiny' if vit == VIT_TINY else 'base'}-16-224"
    return image_dir, write_photo_jpegs(image_dir, n), build_hf_vit(root / name, **vit)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    top = np.sort(probs, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def _recorded(ctx, spec):
    """The spec recorded as a job in this process (planned as submit plans it: workers/inprocess.py),
    its model loaded into ctx's cache; the clock starts after this."""
    from orchestrator.published.outputs import job_dir
    from workers import jobheads
    from workers.inprocess import LocalJob
    from workers.memory import keep_freed_memory

    keep_freed_memory()  # like a worker process, this one keeps freed activations (workers/memory.py)
    job = LocalJob.record(spec, ctx)
    jobheads.for_job(spec.model_copy(update={"output": job_dir(spec.output, job.job_id)}), 0, ctx)
    return job


def run_in_process(ctx, spec) -> tuple[float, ShardMarker]:
    """The spec's single shard through the one lifecycle (lease, fenced work, commit), as a warm
    worker runs it; returns (seconds, its commit marker). The job is then finalized off the clock,
    so its output is published as a queued job's is (read it with results.read_table)."""
    job = _recorded(ctx, spec)
    start = time.perf_counter()
    job.run_unit(0, finalize_when_settled=False)
    seconds = time.perf_counter() - start
    job.finish()
    return seconds, job.markers()[0]


def run_shards_in_process(ctx, spec, in_flight: int) -> tuple[float, list[ShardMarker]]:
    """Every shard of the spec on this process, `in_flight` at a time on threads sharing one
    model, as a worker with --shards-in-flight does; returns (seconds, commit markers), the job
    finalized off the clock."""
    from concurrent.futures import ThreadPoolExecutor

    job = _recorded(ctx, spec)
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda shard: job.run_unit(shard, finalize_when_settled=False), range(job.n_units)))
    seconds = time.perf_counter() - start
    job.finish()
    return seconds, job.markers()
