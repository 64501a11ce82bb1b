"""Shards in flight: the same job (2,000 JPEGs in 8 shards, ViT-Tiny/16) run one shard at a time
vs two at a time on one model, as `vitbatch worker --shards-in-flight 1|2` would.

    python -m bench.shards [--n 2000] [--shards 8] [--decode auto]

Prints images/s of both and the ratio, measured in one run.
"""

from __future__ import annotations

import argparse

from bench.common import bench_dir, photos_and_vit, report, run_shards_in_process


def main() -> None:
    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from workers.context import WorkerContext

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--decode", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    root = bench_dir()
    image_dir, paths, model_dir = photos_and_vit(args.n)
    for path in paths:
        path.read_bytes()  # both runs start with the files in the page cache
    ctx = WorkerContext(Settings())
    rates = {}
    for in_flight in (1, 2):
        spec = parse_spec({"kind": "classify", "input": str(image_dir), "output": str(root / f"out-shards-{in_flight}"),
                           "model": str(model_dir), "shard_size": -(-args.n // args.shards), "decode": args.decode,
                           "device": args.device, "batch_size": args.batch_size})
        seconds, _ = run_shards_in_process(ctx, spec, in_flight)
        rates[in_flight] = args.n / seconds
    ctx.decode_pool.close()
    report("shards", {"images": args.n, "shards": args.shards, "one_in_flight_img_s": round(rates[1], 1),
                      "two_in_flight_img_s": round(rates[2], 1), "ratio": round(rates[2] / rates[1], 2)})


if __name__ == "__main__":
    main()
