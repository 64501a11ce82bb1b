"""The offline demo: real handwritten digits (scikit-learn) and a ViT built here, classified
through the embedded stack by the very command a user runs against a cluster.

    python -m workers.demo [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(dest: Path, limit: int | None = None) -> int:
    """scikit-learn's 1,797 8x8 digits as PNG files, one folder per class (ImageFolder layout)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images[:limit], digits.target[:limit]
    for index, (pixels, target) in enumerate(zip(images, targets)):
        folder = dest / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        gray = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(gray, mode="L").resize((32, 32), Image.NEAREST).save(folder / f"digit-{index:04d}.png")
    return len(images)


def build_tiny_vit(dest: Path, num_labels: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A small ViT with its image processor, saved as safetensors (what `--model` loads)."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="vitbatch-demo", help="Where images, model and results go.")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    images, model, output = work / "digits", work / "models" / "tiny-vit", work / "out" / "classify"
    if not images.exists():
        print(f"writing scikit-learn digits to {images}: {write_digits(images)} images")
    if not (model / "config.json").exists():
        build_tiny_vit(model)
        print(f"built a tiny ViT at {model} ({json.loads((model / 'config.json').read_text())['num_hidden_layers']} layers)")
    from orchestrator.cli import main as cli

    cli(["run", "classify", "--input", str(images), "--output", str(output), "--model", str(model),
         "--workers", str(args.workers), "--shard-size", "500", "--overwrite"])


if __name__ == "__main__":
    main()
