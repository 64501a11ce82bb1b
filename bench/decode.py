"""Decode + resize to 224 without a model: threads (PIL under the GIL) vs the decode process pool
(shared memory) vs torchvision's batched decoder on the CPU, over the same in-memory JPEGs.

    python -m bench.decode [--n 2000] [--threads 16]

Prints images/s of each and the ratios to threads, measured in one run. On a GPU host the
device column is what nvJPEG replaces; here it runs torchvision's CPU decoder.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

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
    args = parser.parse_args()
    blobs = [p.read_bytes() for p in write_photo_jpegs(bench_dir() / f"jpegs-500x375-{args.n}", args.n)]
    prep = Preprocess((224, 224), Image.BILINEAR, (0.5,) * 3, (0.5,) * 3)  # HF ViT: stretch to 224
    decoder = Decoder(prep, 50_000_000)
    rates = {}

    with ThreadPoolExecutor(args.threads) as threads:
        start = time.perf_counter()
        list(threads.map(decoder.decode, blobs))
        rates["threads_img_s"] = args.n / (time.perf_counter() - start)

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
    report("decode", {"images": args.n, "cores": len(os.sched_getaffinity(0)),
                      **{k: round(v, 1) for k, v in rates.items()},
                      "processes_vs_threads": round(rates["processes_img_s"] / rates["threads_img_s"], 2)})


if __name__ == "__main__":
    main()
