"""int8 on a trained model: does ONNX Runtime's dynamic int8 keep the fp32 model's answers?

    python -m bench.onnx_trained [--epochs 15]

Random-weight ViTs (bench/onnx.py) only bound the damage int8 does; this trains the
demo's small ViT on scikit-learn's digits (in process, the fine-tune job's own code),
exports it as fp32 and int8 ONNX (the export job's own code), and classifies the
held-out digits with PyTorch fp32, ORT fp32 and ORT int8. It reports top-1 agreement
with PyTorch fp32 (all images and decisive ones, top-2 margin > 0.05), each one's
accuracy against the digit labels, and images/s.
"""

from __future__ import annotations

import argparse

from bench.common import bench_dir, cpu_info, report
from bench.onnx import agreement, classify, export_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    import onnxruntime
    import torch

    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.stack.demo import DEMO_CONFIG, DEMO_TRAINING, write_digits
    from workers.context import WorkerContext
    from workers.training.finetune import finetune

    ctx = WorkerContext(Settings())
    root = bench_dir() / "digits"
    train, holdout = root / "train", root / "holdout"
    if not train.exists():
        write_digits(train, holdout=holdout)
    model = root / f"vit-{args.epochs}-epochs"
    if not (model / "config.json").exists():
        spec = parse_spec({"kind": "finetune", "train": str(train), "output": str(model), "config": DEMO_CONFIG,
                           **{**DEMO_TRAINING, "epochs": args.epochs}})
        finetune(spec, "bench", ctx, lambda _progress: None)
    n = sum(1 for _ in holdout.rglob("*.png"))
    figures: dict = {"model": f"demo ViT, {args.epochs} epochs on the digits", "images": n}
    runs = {"pytorch_fp32": (model, "fp32"), "ort_fp32": (export_dir(model, "none", ctx), "fp32"),
            "ort_int8": (export_dir(model, "int8", ctx), "fp32")}
    reference = None
    for label, (directory, precision) in runs.items():
        rate, rows, labels = classify(directory, holdout, root / f"out-{args.epochs}-{label}", n, precision, ctx,
                                      with_labels=True)
        reference = reference or rows
        decisive, n_decisive = agreement(reference, rows)
        everything = sum(rows[key][0] == reference[key][0] for key in reference) / len(reference)
        accuracy = sum(labels[key] == key.split("/")[0] for key in labels) / len(labels)
        figures[label] = {"img_s": round(rate, 2), "top1_agreement_all": round(everything, 4),
                          "top1_agreement_decisive": decisive, "accuracy": round(accuracy, 4)}
        figures["decisive_images"] = n_decisive
    report("onnx_trained", {**cpu_info(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                            **figures})


if __name__ == "__main__":
    main()
