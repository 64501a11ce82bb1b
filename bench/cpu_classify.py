"""Benchmark 1: classify end to end through the vitbatch pipeline (its defaults) vs the plain
fp32 loop from the transformers docs, on the same 2,000 500x375 JPEGs and ViT-Tiny/16 at 224.

    python bench/cpu_classify.py [--n 2000]

Prints images/s of both, their ratio, and top-1 agreement on images whose fp32 top-2
probability margin exceeds 0.05 (random weights leave near-ties). Also the model alone on
ready tensors (fp32, same batch size): no pipeline can beat the plain loop by more than
model-only / plain on this CPU unless the model itself runs faster (bf16 on AMX).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from bench.common import bench_dir, photos_and_vit, report, run_in_process, timed, top2_margin


def load_plain(model_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return AutoImageProcessor.from_pretrained(model_dir), AutoModelForImageClassification.from_pretrained(model_dir).eval()


def plain_loop(processor, model, paths, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """What a user writes from the transformers docs: processor on each batch of PIL images, then the model."""
    labels, probs = [], []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
            p = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
            probs.append(p.numpy())
            labels.append(p.argmax(-1).numpy())
    return np.concatenate(labels), np.concatenate(probs)


def model_only(model, batch_size: int, images: int = 512) -> float:
    x = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(pixel_values=x)
        start = time.perf_counter()
        for _ in range(images // batch_size):
            model(pixel_values=x)
    return (images // batch_size) * batch_size / (time.perf_counter() - start)


def vitbatch_pipeline(model_dir, image_dir, out_dir, n: int) -> tuple[dict[str, int], dict]:
    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.published.results import read_table
    from workers.context import WorkerContext

    spec = parse_spec({"kind": "classify", "input": str(image_dir), "output": str(out_dir),
                       "model": str(model_dir), "shard_size": n})
    _, marker = run_in_process(WorkerContext(Settings()), spec)
    table = read_table(str(out_dir))  # published as a queued job's is: the job's parts, through its record
    return dict(zip(table.column("key").to_pylist(), table.column("label_id").to_pylist())), marker.stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    root = bench_dir()
    image_dir, paths, model_dir = photos_and_vit(args.n)
    t = {}
    processor, model = load_plain(model_dir)
    with timed("plain_s", t):
        plain_labels, plain_probs = plain_loop(processor, model, paths, args.batch_size)
    out = root / "out-cpu-classify"
    with timed("vitbatch_s", t):
        ours, stats = vitbatch_pipeline(model_dir, image_dir, out, args.n)
    ceiling = max(model_only(model, args.batch_size), model_only(model, 16))  # the plain loop's and vitbatch's CPU batch
    margin = top2_margin(plain_probs)
    decisive = [i for i, m in enumerate(margin) if m > 0.05]
    agree = sum(ours[paths[i].name] == plain_labels[i] for i in decisive)
    report("cpu_classify", {
        "images": args.n, "plain_fp32_img_s": round(args.n / t["plain_s"], 1),
        "vitbatch_img_s": round(args.n / t["vitbatch_s"], 1), "ratio": round(t["plain_s"] / t["vitbatch_s"], 2),
        "model_only_fp32_best_batch_img_s": round(ceiling, 1), "ceiling_vs_plain": round(ceiling * t["plain_s"] / args.n, 2),
        "decisive_images": len(decisive), "top1_agreement": round(agree / max(len(decisive), 1), 4),
        "vitbatch_stage_seconds": stats, "torch_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
