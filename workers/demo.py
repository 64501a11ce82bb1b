"""The offline demo on real data: scikit-learn's handwritten digits, through the real stack.

    python -m workers.demo [--workdir DIR] [--workers N] [--quick]

On the embedded stack (a private Redis-compatible server, local worker processes, the
local directory as the object store) it fine-tunes a small ViT from scratch through
the queue, evaluates it on held-out digits, classifies them, and computes embeddings
and attention overlays for a few, then prints the figures. `--quick` only classifies
with an untrained ViT (the machinery in 30 seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Found by search on this 2-core machine (see the closing notes of the fine-tuning issue).
# 8x8 patches of the 32x32 digits: 16 tokens, so attention is cheap and 30 epochs fit in two minutes.
DEMO_CONFIG = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "intermediate_size": 128, "hidden_dropout_prob": 0.1}
# No augmentation: horizontal flips turn digits into other glyphs (basic: 93% instead of 96%).
DEMO_TRAINING = {"epochs": 30, "lr": 1e-3, "batch_size": 16, "weight_decay": 0.05, "warmup_ratio": 0.1,
                 "augment": "none", "val_split": 0.1, "seed": 0, "checkpoint_every_steps": 200}
HOLDOUT_EVERY = 6  # every 6th digit is held out of training: 300 images for evaluate and classify


def write_digits(dest: Path, limit: int | None = None, holdout: Path | None = None) -> int:
    """scikit-learn's 1,797 8x8 digits as 32x32 PNGs, one folder per class (ImageFolder layout).

    With `holdout`, every HOLDOUT_EVERY-th image goes there instead of `dest`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images[:limit], digits.target[:limit]
    for index, (pixels, target) in enumerate(zip(images, targets)):
        root = holdout if holdout is not None and index % HOLDOUT_EVERY == 0 else dest
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        gray = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(gray, mode="L").resize((32, 32), Image.NEAREST).save(folder / f"digit-{index:04d}.png")
    return len(images)


def build_tiny_vit(dest: Path, num_labels: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A small untrained ViT with its image processor, saved as safetensors (what `--model` loads)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)}, label2id={str(i): i for i in range(num_labels)},
    )
    ViTForImageClassification(config).save_pretrained(dest)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(dest)
    return dest


def _step(client, title: str, spec: dict) -> dict:
    """Submit one job through the queue, show its progress bar, and insist that it succeeded."""
    from orchestrator.cli import _watch, err
    from orchestrator.jobs import parse_spec

    err.print(f"\n[bold]{title}[/]")
    job_id, summary = client.submit(parse_spec(spec), overwrite=True)
    status = _watch(client, job_id, summary["items"])
    if status.state.value != "succeeded":
        raise SystemExit(f"{title} ended {status.state.value}: {status.reason or status.failed_shards}")
    return {"job_id": job_id, "wall_s": status.finished_at - status.created_at, "status": status}


def _job_file(output: Path, name: str) -> dict:
    """A JSON file of the latest succeeded job at `output` (its folder is named in _SUCCESS.json)."""
    record = json.loads((output / "_SUCCESS.json").read_text())
    return json.loads((output / record["job_dir"] / name).read_text())


def _job_folder(output: Path) -> Path:
    return output / json.loads((output / "_SUCCESS.json").read_text())["job_dir"]


def full_story(work: Path, workers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.embedded import EmbeddedStack
    from orchestrator.results import read_arrays, read_embeddings, read_table
    from orchestrator.submit import Client

    train, holdout = work / "digits" / "train", work / "digits" / "holdout"
    if not train.exists():
        print(f"writing scikit-learn digits to {train} and {holdout}: {write_digits(train, holdout=holdout)} images")
    model, out = work / "models" / "digits-vit", work / "out"
    few = holdout / "few.txt"
    few.write_text("".join(p.relative_to(holdout).as_posix() + "\n" for p in sorted(holdout.rglob("*.png"))[:24]))
    started = time.time()
    with EmbeddedStack(workers=workers) as stack:
        client = Client.from_settings(stack.settings)
        tuned = _step(client, "1/5 fine-tune a ViT from scratch on the digits (train queue)", {
            "kind": "finetune", "train": str(train), "output": str(model), "config": DEMO_CONFIG,
            "alias": str(work / "models" / "latest"), **DEMO_TRAINING})
        _step(client, "2/5 evaluate on the held-out digits", {
            "kind": "evaluate", "input": str(holdout), "output": str(out / "evaluate"), "model": str(model)})
        classified = _step(client, "3/5 classify the held-out digits", {
            "kind": "classify", "input": str(holdout), "output": str(out / "classify"), "model": str(model),
            "shard_size": 100})
        _step(client, "4/5 embeddings (CLS and mean) of a few", {
            "kind": "embed", "input": str(few), "output": str(out / "embed"), "model": str(model),
            "pooling": "cls,mean"})
        _step(client, "5/5 attention maps and overlays of a few", {
            "kind": "attention", "input": str(few), "output": str(out / "attention"), "model": str(model),
            "max_overlays": 8})
        metrics = _job_file(model, "metrics.json")
        evaluation = _job_file(out / "evaluate", "metrics.json")
        rows = read_table(str(out / "classify"), client.store).to_pylist()
        _, cls = read_embeddings(str(out / "embed"), "cls", client.store)
        _, rollout = read_arrays(str(out / "attention"), "rollout", client.store)
    console = Console()
    correct = sum(r["label"] == r["key"].split("/")[0] for r in rows)
    table = Table("what", "figure", title="vitbatch demo: scikit-learn digits, offline, through the queue")
    table.add_row("fine-tune wall time", f"{tuned['wall_s']:.0f} s ({DEMO_TRAINING['epochs']} epochs)")
    table.add_row("validation accuracy (10% of train)", f"{metrics['val_accuracy']:.3f}")
    table.add_row("held-out accuracy (evaluate)", f"{evaluation['accuracy']:.3f} (top-5 {evaluation['top5_accuracy']:.3f})")
    table.add_row("held-out accuracy (classify rows)", f"{correct / len(rows):.3f} over {len(rows)} images")
    table.add_row("classify throughput", f"{classified['status'].images_per_s:.0f} img/s")
    table.add_row("embeddings", f"cls {tuple(cls.shape)} {cls.dtype}")
    table.add_row("attention rollout maps", f"{tuple(rollout.shape)}, overlays in {_job_folder(out / 'attention') / 'overlays'}")
    table.add_row("whole demo", f"{time.time() - started:.0f} s")
    console.print(table)
    console.print(f"model: {model} (use it as --model; its files: {_job_folder(model)}); results under {out}")
    for row in rows[:5]:
        console.print(f"  {row['key']}: {row['label']} ({row['score']:.3f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="vitbatch-demo", help="Where images, model and results go.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="Only classify with an untrained ViT.")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    if not args.quick:
        full_story(work, args.workers)
        return
    images, model = work / "digits" / "all", work / "models" / "tiny-vit"
    if not images.exists():
        print(f"writing scikit-learn digits to {images}: {write_digits(images)} images")
    if not (model / "config.json").exists():
        build_tiny_vit(model)
    from orchestrator.cli import main as cli

    cli(["run", "classify", "--input", str(images), "--output", str(work / "out" / "quick"), "--model", str(model),
         "--workers", str(args.workers), "--shard-size", "500", "--overwrite"])


if __name__ == "__main__":
    main()
