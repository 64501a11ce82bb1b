"""The offline demo on real data: scikit-learn's handwritten digits, through the real stack.

    vitbatch demo [--workdir DIR] [--workers N] [--quick]

On the embedded stack (a private Redis-compatible server, local worker processes, the
local directory as the object store) it fine-tunes a small ViT from scratch through
the queue, evaluates it on held-out digits, classifies them, and computes embeddings
and attention overlays for a few, then prints the figures. `--quick` fine-tunes for one
epoch and classifies the held-out digits (the machinery in about a minute).

The model is built by the worker from a `config`, so nothing here needs torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from orchestrator.constants import OVERLAYS_DIR, SUCCESS_FILE
from orchestrator.errors import VitbatchError
from orchestrator.lifecycle.commits import JobRecord

# Found by search on this 2-core machine (see the closing notes of the fine-tuning issue).
# 8x8 patches of the 32x32 digits: 16 tokens, so attention is cheap and 30 epochs fit in two minutes.
DEMO_CONFIG = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "intermediate_size": 128, "hidden_dropout_prob": 0.1}
# No augmentation: horizontal flips turn digits into other glyphs (basic: 93% instead of 96%).
DEMO_TRAINING = {"epochs": 30, "lr": 1e-3, "batch_size": 16, "weight_decay": 0.05, "warmup_ratio": 0.1,
                 "augment": "none", "val_split": 0.1, "seed": 0, "checkpoint_every_steps": 200}
QUICK_TRAINING = {**DEMO_TRAINING, "epochs": 1, "val_split": 0.0}  # no evaluation pass: the machinery, fast
HOLDOUT_EVERY = 6  # every 6th digit is held out of training: 300 images for evaluate and classify


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise VitbatchError("the demo's images are scikit-learn's digits, and scikit-learn is not installed: "
                            "pip install scikit-learn (or the dev extra: pip install 'vitbatch[dev]')") from e
    return load_digits()


def write_digits(dest: Path, limit: int | None = None, holdout: Path | None = None) -> int:
    """scikit-learn's 1,797 8x8 digits as 32x32 PNGs, one folder per class (ImageFolder layout).

    With `holdout`, every HOLDOUT_EVERY-th image goes there instead of `dest`.
    """
    from PIL import Image

    digits = _load_digits()
    images, targets = digits.images[:limit], digits.target[:limit]
    for index, (pixels, target) in enumerate(zip(images, targets)):
        root = holdout if holdout is not None and index % HOLDOUT_EVERY == 0 else dest
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        gray = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(gray, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(folder / f"digit-{index:04d}.png")
    return len(images)


def _step(client, title: str, spec: dict) -> dict:
    """Submit one job through the queue, show its progress bar, and insist that it succeeded."""
    from orchestrator.commands.terminal import err, watch
    from orchestrator.jobspec.jobs import parse_spec

    err.print(f"\n[bold]{title}[/]")
    job_id, plan = client.submit(parse_spec(spec), overwrite=True)
    status = watch(client, job_id, plan["items"])
    if status.state.value != "succeeded":
        raise SystemExit(f"{title} ended {status.state.value}: {status.reason or status.failed_shards}")
    return {"job_id": job_id, "wall_s": status.finished_at - status.created_at, "status": status}


def _job_file(output: Path, name: str) -> dict:
    """A JSON file of the latest succeeded job at `output` (its folder is named in _SUCCESS.json)."""
    return json.loads((_job_folder(output) / name).read_text())


def _job_folder(output: Path) -> Path:
    """The folder of the latest succeeded job at `output`, as its record names it."""
    return output / JobRecord.from_json(json.loads((output / SUCCESS_FILE).read_text())).job_dir


def _digits(work: Path) -> tuple[Path, Path]:
    """(train, holdout) folders of the digits, written on the first run."""
    train, holdout = work / "digits" / "train", work / "digits" / "holdout"
    if not train.exists():
        print(f"writing scikit-learn digits to {train} and {holdout}: {write_digits(train, holdout=holdout)} images")
    return train, holdout


def _finetune(train: Path, model: Path, training: dict, alias: Path | None = None) -> dict:
    spec = {"kind": "finetune", "train": str(train), "output": str(model), "config": DEMO_CONFIG, **training}
    return spec if alias is None else {**spec, "alias": str(alias)}


def _classify(holdout: Path, out: Path, model: Path) -> dict:
    return {"kind": "classify", "input": str(holdout), "output": str(out), "model": str(model), "shard_size": 100}


def _accuracy(rows: list[dict]) -> float:
    """Share of classify rows whose label is the digit's folder."""
    return sum(r["label"] == r["key"].split("/")[0] for r in rows) / len(rows)


def full_story(work: Path, workers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.published.results import read_arrays, read_embeddings, read_table
    from orchestrator.stack.embedded import EmbeddedStack
    from orchestrator.submission.submit import Client

    train, holdout = _digits(work)
    model, out = work / "models" / "digits-vit", work / "out"
    few = holdout / "few.txt"
    few.write_text("".join(p.relative_to(holdout).as_posix() + "\n" for p in sorted(holdout.rglob("*.png"))[:24]))
    started = time.time()
    with EmbeddedStack(workers=workers) as stack:
        client = Client.from_settings(stack.settings)
        tuned = _step(client, "1/5 fine-tune a ViT from scratch on the digits (train queue)",
                      _finetune(train, model, DEMO_TRAINING, alias=work / "models" / "latest"))
        _step(client, "2/5 evaluate on the held-out digits", {
            "kind": "evaluate", "input": str(holdout), "output": str(out / "evaluate"), "model": str(model)})
        classified = _step(client, "3/5 classify the held-out digits", _classify(holdout, out / "classify", model))
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
    table = Table("what", "figure", title="vitbatch demo: scikit-learn digits, offline, through the queue")
    table.add_row("fine-tune wall time", f"{tuned['wall_s']:.0f} s ({DEMO_TRAINING['epochs']} epochs)")
    table.add_row("validation accuracy (10% of train)", f"{metrics['val_accuracy']:.3f}")
    table.add_row("held-out accuracy (evaluate)", f"{evaluation['accuracy']:.3f} (top-5 {evaluation['top5_accuracy']:.3f})")
    table.add_row("held-out accuracy (classify rows)", f"{_accuracy(rows):.3f} over {len(rows)} images")
    table.add_row("classify throughput", f"{classified['status'].images_per_s:.0f} img/s")
    table.add_row("embeddings", f"cls {tuple(cls.shape)} {cls.dtype}")
    table.add_row("attention rollout maps", f"{tuple(rollout.shape)}, overlays in {_job_folder(out / 'attention') / OVERLAYS_DIR}")
    table.add_row("whole demo", f"{time.time() - started:.0f} s")
    console.print(table)
    console.print(f"model: {model} (use it as --model; its files: {_job_folder(model)}); results under {out}")
    for row in rows[:5]:
        console.print(f"  {row['key']}: {row['label']} ({row['score']:.3f})")


def quick_story(work: Path, workers: int) -> None:
    """One epoch of fine-tuning, then classify the held-out digits: every queue and worker path, fast."""
    from orchestrator.commands.terminal import console
    from orchestrator.published.results import read_table
    from orchestrator.stack.embedded import EmbeddedStack
    from orchestrator.submission.submit import Client

    train, holdout = _digits(work)
    model, out = work / "models" / "quick-vit", work / "out" / "quick"
    started = time.time()
    with EmbeddedStack(workers=workers) as stack:
        client = Client.from_settings(stack.settings)
        tuned = _step(client, "1/2 fine-tune a ViT from scratch for one epoch", _finetune(train, model, QUICK_TRAINING))
        _step(client, "2/2 classify the held-out digits", _classify(holdout, out, model))
        rows = read_table(str(out), client.store).to_pylist()
    console.print(f"one epoch ({tuned['wall_s']:.0f} s): {_accuracy(rows):.3f} held-out accuracy over {len(rows)} "
                  f"images, {time.time() - started:.0f} s in all; model {model}, results {out}")
    for row in rows[:5]:
        console.print(f"  {row['key']}: {row['label']} ({row['score']:.3f})")


def run_demo(workdir: str, workers: int, quick: bool) -> None:
    """`vitbatch demo`: the whole story, or with `quick` the short one, under `workdir`."""
    work = Path(workdir).resolve()
    (quick_story if quick else full_story)(work, workers)
