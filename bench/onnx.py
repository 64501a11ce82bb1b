"""Benchmark 8: classify end to end through the vitbatch pipeline, PyTorch against ONNX Runtime.

    python -m bench.onnx [--n 2000] [--models tiny,base] [--n-base N]

The same 500x375 JPEGs (cut from scikit-learn's sample photos) and HF ViT-Tiny/16 and
ViT-Base/16 at 224 (random weights, classifier scaled so that top-1 is decisive), run as
classify shards in this process with: PyTorch fp32, PyTorch --precision auto, the fp32
ONNX export on ORT, and the int8 (dynamic quantization) export on ORT. Prints images/s,
the ratio to PyTorch fp32, and top-1 agreement with PyTorch fp32 on decisive images
(top-2 probability margin > 0.05), plus the CPU model and whether AMX / AVX512-BF16 /
AVX512-VNNI / AVX-VNNI are there (int8 MatMuls run much faster with VNNI).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import (
    VIT_BASE,
    VIT_TINY,
    bench_dir,
    build_hf_vit,
    cpu_info,
    report,
    run_in_process,
    write_photo_jpegs,
)


def export_dir(model_dir: Path, quantize: str, ctx) -> Path:
    """The model exported once (cached next to it); parity on 32 synthetic images, int8 threshold off."""
    from orchestrator.jobspec.jobs import parse_spec
    from workers.onnx.export import export

    dest = model_dir.parent / f"{model_dir.name}-onnx-{quantize}"
    if not (dest / "config.json").exists():
        spec = parse_spec({"kind": "export", "model": str(model_dir), "output": str(dest), "quantize": quantize,
                           "samples": 32, "int8_min_agreement": 0.0})
        export(spec, "bench", ctx)
    return dest


def classify(model: Path, image_dir: Path, out: Path, n: int, precision: str, ctx, with_labels: bool = False):
    """(images/s, key -> (label_id, top-2 margin)) of one classify shard run as a warm worker runs it;
    with_labels adds key -> label name."""
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.published.results import read_table

    spec = parse_spec({"kind": "classify", "input": str(image_dir), "output": str(out), "model": str(model),
                       "shard_size": n, "precision": precision, "top_k": 2})
    seconds, _ = run_in_process(ctx, spec)
    table = [r for r in read_table(str(out)).to_pylist() if r["error"] is None]
    rows = {r["key"]: (r["label_id"], r["topk_scores"][0] - r["topk_scores"][1]) for r in table}
    if with_labels:
        return n / seconds, rows, {r["key"]: r["label"] for r in table}
    return n / seconds, rows


def agreement(reference: dict, rows: dict) -> tuple[float, int]:
    decisive = [key for key, (_, margin) in reference.items() if margin > 0.05]
    same = sum(rows[key][0] == reference[key][0] for key in decisive)
    return round(same / max(len(decisive), 1), 4), len(decisive)


def bench_model(name: str, vit: dict, n: int, ctx) -> dict:
    root = bench_dir()
    image_dir = root / f"jpegs-500x375-{n}"
    write_photo_jpegs(image_dir, n)
    model_dir = build_hf_vit(root / f"vit-{name}-16-224", **vit)
    figures: dict = {"model": f"ViT-{name.capitalize()}/16 224", "images": n}
    runs = {"pytorch_fp32": (model_dir, "fp32"), "pytorch_auto": (model_dir, "auto"),
            "ort_fp32": (export_dir(model_dir, "none", ctx), "fp32"),
            "ort_int8": (export_dir(model_dir, "int8", ctx), "fp32")}
    reference = None
    for label, (model, precision) in runs.items():
        rate, rows = classify(model, image_dir, root / f"out-onnx-{name}-{label}", n, precision, ctx)
        reference = reference or rows
        top1, decisive = agreement(reference, rows)
        figures[label] = {"img_s": round(rate, 2), "top1_agreement_decisive": top1}
        figures["decisive_images"] = decisive
    base = figures["pytorch_fp32"]["img_s"]
    for label in runs:
        figures[label]["ratio_to_pytorch_fp32"] = round(figures[label]["img_s"] / base, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="JPEGs per run (ViT-Tiny)")
    parser.add_argument("--n-base", type=int, default=None, help="JPEGs per run for ViT-Base (default --n)")
    parser.add_argument("--models", default="tiny,base")
    args = parser.parse_args()
    import onnxruntime
    import torch

    from orchestrator.config import Settings
    from workers.context import WorkerContext

    ctx = WorkerContext(Settings())
    info = {**cpu_info(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads()}
    for name in args.models.split(","):
        vit = VIT_TINY if name == "tiny" else VIT_BASE
        n = args.n if name == "tiny" else (args.n_base or args.n)
        report("onnx", {**info, **bench_model(name, vit, n, ctx)})


if __name__ == "__main__":
    main()
