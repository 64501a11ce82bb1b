"""For a lent H100: ViT-B/16 fp16 model-only vs end-to-end images/s on 500x375 JPEGs read from
the local store, with the plain "image processor + model" loop as the baseline, in one run.
End to end runs once per decode path (threads, processes, device = nvJPEG + processes), then
the device path with torch.compile and two shards in flight.

    python -m bench.gpu [--n 8192] [--batch-size 256] [--peers 2000]

Goal: end to end at least 7,000 img/s. Prints one JSON line; copy it to bench/RESULTS.md
with the card, the date and the command.

`--peers N` then runs benchmark 9's peers on the GPU, each a fresh process timed whole, on N
of the same JPEGs with ViT-Tiny/16: `python -m bench.peers --device cuda --n N` (the plain
loop, the HF pipeline, Ray Data and, where its folder is installed, Daft, each fp32 and fp16,
against `vitbatch run classify` with its defaults). Its table and JSON line follow this
script's; about 5 minutes for N = 2000 on an H100, so on a lent machine with little time run
it as its own call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from bench.common import VIT_BASE, bench_dir, photos_and_vit, report, run_shards_in_process


def model_only(model_dir, batch_size: int, steps: int = 30) -> float:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float16,
                                                            attn_implementation="sdpa").cuda().eval()
    x = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for _ in range(5):
            model(pixel_values=x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(pixel_values=x)
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def plain_loop(model_dir, paths, batch_size: int) -> float:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + batch_size]]
            inputs = processor(images, return_tensors="pt").to("cuda", torch.float16)
            model(**inputs).logits.argmax(-1).cpu()
    return len(paths) / (time.perf_counter() - start)


def end_to_end(ctx, name: str, model_dir, image_dir, n: int, batch_size: int, decode: str, compile: bool = False,
               in_flight: int = 1, shards: int = 1) -> tuple[float, dict, dict[str, int]]:
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.published.results import read_table

    spec = parse_spec({"kind": "classify", "input": str(image_dir), "output": str(bench_dir() / f"out-gpu-{name}"),
                       "model": str(model_dir), "shard_size": -(-n // shards), "batch_size": batch_size,
                       "precision": "fp16", "device": "cuda", "compile": compile, "read_concurrency": 32,
                       "decode": decode})
    run_shards_in_process(ctx, spec, in_flight)  # warm: decode processes started, compile done
    seconds, markers = run_shards_in_process(ctx, spec, in_flight)
    table = read_table(str(bench_dir() / f"out-gpu-{name}"))  # published as a queued job's is, through its record
    return n / seconds, markers[0].stats, dict(zip(table.column("key").to_pylist(), table.column("label_id").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--peers", type=int, default=0, metavar="N",
                        help="then the peers of bench.peers on the GPU, on N images (0: not run)")
    args = parser.parse_args()
    image_dir, paths, model_dir = photos_and_vit(args.n, VIT_BASE)
    figures = {"device": torch.cuda.get_device_name(0), "images": args.n, "batch_size": args.batch_size}
    figures["model_only_img_s"] = round(model_only(model_dir, args.batch_size), 1)
    figures["plain_loop_img_s"] = round(plain_loop(model_dir, paths[:2048], args.batch_size), 1)
    from orchestrator.config import Settings
    from workers.context import WorkerContext

    ctx = WorkerContext(Settings())
    runs = {"threads": {"decode": "threads"}, "processes": {"decode": "processes"}, "device": {"decode": "device"},
            "device_compile": {"decode": "device", "compile": True},
            "device_compile_2_in_flight_8_shards": {"decode": "device", "compile": True, "in_flight": 2, "shards": 8}}
    labels = {}
    for name, options in runs.items():
        rate, stats, labels[name] = end_to_end(ctx, name, model_dir, image_dir, args.n, args.batch_size, **options)
        figures[f"{name}_img_s"], figures[f"{name}_stages"] = round(rate, 1), stats
        # Same model, other decode path: how many top-1 labels match the threads (PIL) path.
        same = sum(labels[name].get(key) == label for key, label in labels["threads"].items())
        figures[f"{name}_top1_same_as_threads"] = round(same / len(labels["threads"]), 4)
        figures[f"{name}_vs_plain"] = round(rate / figures["plain_loop_img_s"], 2)
        figures[f"{name}_vs_model_only"] = round(rate / figures["model_only_img_s"], 3)
        print(name, round(rate, 1), flush=True)  # partial results survive a timeout
    onnx_run(ctx, figures, model_dir, image_dir, args, labels["threads"])
    report("gpu", figures)
    if args.peers:
        peers_on_gpu(args.peers)


def peers_on_gpu(n: int) -> None:
    """Benchmark 9 with every peer's model on CUDA; Daft only where its --target folder exists."""
    from bench.peers import DEFAULT_DAFT_PATH, ROOT

    systems = "plain,pipeline,ray" + (",daft" if (DEFAULT_DAFT_PATH / "daft").is_dir() else "") + ",vitbatch"
    cmd = [sys.executable, "-m", "bench.peers", "--device", "cuda", "--n", str(n), "--systems", systems]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def onnx_run(ctx, figures: dict, model_dir, image_dir, args, reference: dict[str, int]) -> None:
    """The same job on the fp32 ONNX export, on ONNX Runtime's CUDA execution provider (the
    onnxruntime-gpu wheel); a host without it reports why instead of a figure."""
    try:
        import onnxruntime

        from bench.onnx import export_dir

        figures["onnxruntime_providers"] = onnxruntime.get_available_providers()
        onnx_dir = export_dir(model_dir, "none", ctx)
        rate, stats, labels = end_to_end(ctx, "onnx_cuda", onnx_dir, image_dir, args.n, args.batch_size,
                                         decode="device")
    except Exception as e:  # a lent GPU is rare: keep every other figure of the run
        figures["onnx_cuda_error"] = f"{type(e).__name__}: {e}"
        return
    figures["onnx_cuda_img_s"], figures["onnx_cuda_stages"] = round(rate, 1), stats
    same = sum(labels.get(key) == label for key, label in reference.items())
    figures["onnx_cuda_top1_same_as_threads"] = round(same / len(reference), 4)
    figures["onnx_cuda_vs_plain"] = round(rate / figures["plain_loop_img_s"], 2)


if __name__ == "__main__":
    main()
