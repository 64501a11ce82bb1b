"""Decode + resize to 224 without a model: threads (PIL under the GIL) vs the decode process pool
(shared memory) vs torchvision's batched decoder on the CPU, over the same in-memory JPEGs; and
the exact decode (the default) against `--jpeg-decode fast` (PIL's reduced-scale JPEG draft).

    python -m bench.decode [--n 2000] [--threads 16] [--size 1600x1200]

Prints images/s of each and the ratios to threads, measured in one run, and how far the fast
decode's model inputs are from the exact ones: the cosine of the normalized input tensors and
the mean absolute difference in grey levels. A 500x375 JPEG (the default) is not drafted for a
224 input (half scale would be under 224); `--size 1600x1200` shows what fast buys. On a GPU
host the device column is what nvJPEG replaces; here it runs torchvision's CPU decoder.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from bench.common import bench_dir, report, write_photo_jpegs


def main() -> None:
    from workers.decode.device import decode_batch, resize_batch
    from workers.decode.pool import DecodePool
    from workers.decode.preprocess import Decoder, Preprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--size", default="500x375", help="the JPEGs' width x height")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    folder = bench_dir() / (f"jpegs-500x375-{args.n}" if (width, height) == (500, 375) else f"jpegs-{args.size}-{args.n}")
    blobs = [p.read_bytes() for p in write_photo_jpegs(folder, args.n, (width, height))]
    # HF ViT (google/vit-base-patch16-224): stretch to 224, bilinear, its torchvision-backend resize.
    prep = Preprocess((224, 224), Image.BILINEAR, (0.5,) * 3, (0.5,) * 3, crop_rounding="floor", resampler="torch")
    decoder = Decoder(prep, 50_000_000)
    rates = {}

    with ThreadPoolExecutor(args.threads) as threads:
        start = time.perf_counter()
        exact = list(threads.map(decoder.decode, blobs))
        rates["threads_img_s"] = args.n / (time.perf_counter() - start)
        start = time.perf_counter()
        fast = list(threads.map(Decoder(prep, 50_000_000, fast=True).decode, blobs))
        rates["threads_fast_img_s"] = args.n / (time.perf_counter() - start)

        pool = DecodePool()
        with pool.slot_block(args.threads * 2, (224, 224, 3), decoder) as block:
            def one(blob):
                slot, error, _ = block.decode(blob)
                block.release(slot)
            list(threads.map(one, blobs[:200]))  # start the processes before the clock
            start = time.perf_counter()
            list(threads.map(one, blobs))
            rates["processes_img_s"] = args.n / (time.perf_counter() - start)
        pool.close()

    start = time.perf_counter()
    for i in range(0, args.n, 256):
        resize_batch(decode_batch(blobs[i:i + 256], torch.device("cpu")), prep)
    rates["torchvision_cpu_batched_img_s"] = args.n / (time.perf_counter() - start)
    report("decode", {"images": args.n, "size": args.size, "cores": len(os.sched_getaffinity(0)),
                      **{k: round(v, 1) for k, v in rates.items()},
                      "processes_vs_threads": round(rates["processes_img_s"] / rates["threads_img_s"], 2),
                      "fast_vs_exact": round(rates["threads_fast_img_s"] / rates["threads_img_s"], 2),
                      **fast_against_exact(exact, fast)})


def fast_against_exact(exact: list[np.ndarray], fast: list[np.ndarray]) -> dict:
    """How far `--jpeg-decode fast` moves the model's input: the cosine of each image's normalized
    input tensor (x / 127.5 - 1, ViT's) with the exact one's, and the mean absolute level difference."""
    a = np.stack(exact).reshape(len(exact), -1).astype(np.float64) / 127.5 - 1
    b = np.stack(fast).reshape(len(fast), -1).astype(np.float64) / 127.5 - 1
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    levels = np.abs(a - b).mean(1) * 127.5
    return {"fast_input_cosine_min": round(float(cosine.min()), 5), "fast_input_cosine_mean": round(float(cosine.mean()), 5),
            "fast_mean_abs_levels": round(float(levels.mean()), 3)}


if __name__ == "__main__":
    main()
