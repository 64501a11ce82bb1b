"""Fine-tuning: `vitbatch run finetune` against the plain transformers Trainer recipe, whole processes.

    python -m bench.finetune [--epochs 30] [--rounds 2] [--seeds 0] [--precision fp32] [--paired] [--workdir DIR]

Both train the same custom ViTConfig (32 px, patch 4, hidden 96, 4 layers) from scratch on the same
1,347 scikit-learn digits (the demo's training folder less every 10th image; no validation pass in
either), lr 2e-3, batch 64, no augmentation, the same seed (0, or --seeds), in one precision for both: fp32, or bf16 autocast
(`bf16=True` for the Trainer, which autocasts on a CPU too; `--precision bf16` for vitbatch). Each is one fresh process timed whole
(vitbatch's embedded stack start-up included); the rounds alternate the order. Held-out accuracy is
measured here afterwards on the demo's 300 held-out digits, both models loaded with transformers
and fed the same normalized pixels. Prints the CPU, each run, and the wall-time ratio per round.

--paired runs the two at the same time instead, each pinned to a core of its own with one compute thread
(vitbatch's whole embedded stack on its core), and swaps the cores every round. On a shared 2-core VM
the speed drifts by 10-30% within a minute (the plain Trainer's epochs, one process, one config:
2.5 to 3.7 s), so whole runs minutes apart differ by more than the systems do; run side by side, both
meet the same drift, and the swap cancels a faster core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import cpu_info

CONFIG = {"image_size": 32, "patch_size": 4, "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
          "intermediate_size": 384}
TRAINING = {"lr": 2e-3, "batch_size": 64, "weight_decay": 0.05, "warmup_ratio": 0.1}


def write_data(work: Path) -> tuple[Path, Path]:
    """(train, holdout): the demo's digits, every 10th training image left out (1,347 remain)."""
    from orchestrator.stack.demo import write_digits

    full, train, holdout = work / "full", work / "train", work / "holdout"
    if not train.exists():
        write_digits(full, holdout=holdout)
        for index, path in enumerate(sorted(full.rglob("*.png"))):
            if index % 10:
                (train / path.parent.name).mkdir(parents=True, exist_ok=True)
                path.rename(train / path.parent.name / path.name)
    return train, holdout


def _pixels(paths: list[Path]):
    """The digits as normalized NCHW float32 (mean 0.5, std 0.5: ViTImageProcessor's defaults)."""
    import torch
    from PIL import Image

    arrays = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths])
    return (torch.from_numpy(arrays).permute(0, 3, 1, 2) - 0.5) / 0.5


def _labeled(folder: Path) -> tuple[list[Path], list[int]]:
    paths = sorted(folder.rglob("*.png"))
    return paths, [int(p.parent.name) for p in paths]


def plain_trainer(train: Path, out: Path, epochs: int, precision: str, seed: int) -> None:
    """The recipe a transformers user writes: tensors in memory, ViTForImageClassification, Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    paths, labels = _labeled(train)
    pixels, targets = _pixels(paths), torch.tensor(labels)
    dataset = [{"pixel_values": pixels[i], "labels": targets[i]} for i in range(len(paths))]
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**CONFIG, num_labels=10))
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=TRAINING["batch_size"],
                             num_train_epochs=epochs, learning_rate=TRAINING["lr"],
                             weight_decay=TRAINING["weight_decay"], warmup_steps=TRAINING["warmup_ratio"],
                             lr_scheduler_type="linear", seed=seed, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, bf16=precision == "bf16")
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.save_pretrained(out / "model")


def _vitbatch(train: Path, out: Path, epochs: int, precision: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "orchestrator.commands.cli", "run", "finetune", "--train", str(train), "--output",
            str(out), "--config", json.dumps(CONFIG), "--epochs", str(epochs), "--lr", str(TRAINING["lr"]),
            "--batch-size", str(TRAINING["batch_size"]), "--weight-decay", str(TRAINING["weight_decay"]),
            "--warmup-ratio", str(TRAINING["warmup_ratio"]), "--seed", str(seed),
            "--augment", "none", "--val-split", "0", "--precision", precision, "--overwrite"]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _command(system: str, train: Path, out: Path, epochs: int, precision: str, seed: int) -> list[str]:
    if system == "vitbatch":
        return _vitbatch(train, out, epochs, precision, seed)
    return [sys.executable, "-m", "bench.finetune", "--plain", str(train), str(out), str(epochs), precision, str(seed)]


def _pinned(cmd: list[str], core: int) -> subprocess.Popen:
    """cmd on one core with one compute thread (its children, vitbatch's Redis and worker, inherit both)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {core}))


def _result(system: str, out: Path, holdout: Path, precision: str, seed: int, wall_s: float) -> dict:
    return {"system": system, "precision": precision, "seed": seed, "wall_s": round(wall_s, 1),
            "holdout_accuracy": round(holdout_accuracy(_model_dir(out, system), holdout, system == "vitbatch"), 3)}


def run_paired(cores: dict[str, int], train: Path, holdout: Path, work: Path, epochs: int, precision: str,
               seed: int) -> dict[str, dict]:
    """Both systems at once, each on its core (`cores`); each result's wall_s is its own process's."""
    start = time.perf_counter()
    procs = {system: _pinned(_command(system, train, work / f"out-{system}", epochs, precision, seed), core)
             for system, core in cores.items()}
    walls = {}
    while len(walls) < len(procs):
        for system, proc in procs.items():
            if system not in walls and proc.poll() is not None:
                if proc.returncode:  # the other would run on alone, unmeasured: stop it first
                    for other in procs.values():
                        other.kill()
                    raise subprocess.CalledProcessError(proc.returncode, proc.args)
                walls[system] = time.perf_counter() - start
        time.sleep(0.05)
    return {system: _result(system, work / f"out-{system}", holdout, precision, seed, walls[system])
            for system in procs}


def _model_dir(out: Path, system: str) -> Path:
    if system == "trainer":
        return out / "model"
    from orchestrator.constants import SUCCESS_FILE
    from orchestrator.lifecycle.commits import JobRecord

    return out / JobRecord.from_json(json.loads((out / SUCCESS_FILE).read_text())).job_dir


def holdout_accuracy(model_dir: Path, holdout: Path, id2label: bool) -> float:
    import torch
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    paths, labels = _labeled(holdout)
    with torch.no_grad():
        predicted = model(pixel_values=_pixels(paths)).logits.argmax(-1).tolist()
    if id2label:  # vitbatch names its classes by folder; map the class ids back to digits
        predicted = [int(model.config.id2label[i]) for i in predicted]
    return float(np.mean(np.array(predicted) == np.array(labels)))


def run_one(system: str, train: Path, holdout: Path, work: Path, epochs: int, precision: str, seed: int) -> dict:
    out = work / f"out-{system}"
    wall_s = _timed(_command(system, train, out, epochs, precision, seed))
    return _result(system, out, holdout, precision, seed, wall_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs both; odd rounds reverse the order")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both systems train in it (bf16: autocast, fp32 master weights)")
    parser.add_argument("--seeds", default="0", help="comma-separated; round i trains both with seed i mod their "
                        "number (one seed's held-out accuracy on 300 digits moves by a few points)")
    parser.add_argument("--paired", action="store_true", help="both at once, a core each, cores swapped every round")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--plain", nargs=5, metavar=("TRAIN", "OUT", "EPOCHS", "PRECISION", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_trainer(Path(args.plain[0]), Path(args.plain[1]), int(args.plain[2]), args.plain[3], int(args.plain[4]))
        return
    print(json.dumps(cpu_info()))
    with tempfile.TemporaryDirectory(prefix="vitbatch-bench-finetune-") as tmp:
        work = args.workdir or Path(tmp)
        train, holdout = write_data(work)
        print(f"train {len(list(train.rglob('*.png')))} digits, held out {len(list(holdout.rglob('*.png')))}, "
              f"{args.epochs} epochs, {args.precision}")
        seeds = [int(s) for s in args.seeds.split(",")]
        accuracy: dict[str, list[float]] = {"trainer": [], "vitbatch": []}
        for round_ in range(args.rounds):
            order = ["trainer", "vitbatch"] if round_ % 2 == 0 else ["vitbatch", "trainer"]
            seed = seeds[round_ % len(seeds)]
            if args.paired:  # round 1: the Trainer on core 0, vitbatch on core 1; round 2 the reverse...
                results = run_paired({system: core for core, system in enumerate(order)}, train, holdout, work,
                                     args.epochs, args.precision, seed)
                how = f"trainer on core {order.index('trainer')}, vitbatch on core {order.index('vitbatch')}"
            else:
                results = {system: run_one(system, train, holdout, work, args.epochs, args.precision, seed)
                           for system in order}
                how = " then ".join(order)
            for system in order:
                print(json.dumps(results[system]))
                accuracy[system].append(results[system]["holdout_accuracy"])
            ratio = results["vitbatch"]["wall_s"] / results["trainer"]["wall_s"]
            print(f"round {round_ + 1} ({how}, seed {seed}): vitbatch / Trainer wall = {ratio:.2f}x", flush=True)
        print("held-out accuracy, mean over rounds: " + ", ".join(
            f"{system} {np.mean(values):.3f}" for system, values in accuracy.items()))


if __name__ == "__main__":
    main()
