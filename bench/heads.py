"""embed and attention throughput as ratios to classify, same model and images, in one run.

    python bench/heads.py [--n 500]

Target: embed within 10% of classify. attention pays for eager attention (SDPA returns
no weights) plus rollout and overlays (capped with --max-overlays in the job).
"""

from __future__ import annotations

import argparse

from bench.common import bench_dir, photos_and_vit, report, run_in_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from workers.context import WorkerContext

    root = bench_dir()
    image_dir, _, model = photos_and_vit(args.n)
    ctx = WorkerContext(Settings())
    kinds = {"classify": {}, "embed": {"pooling": "cls,mean"}, "attention": {"max_overlays": 0}}
    seconds = {}
    for kind, extra in kinds.items():
        spec = parse_spec({"kind": kind, "input": str(image_dir), "output": str(root / f"out-heads-{kind}"),
                           "model": str(model), "shard_size": args.n, **extra})
        seconds[kind], _ = run_in_process(ctx, spec)
    report("heads", {"images": args.n, **{f"{k}_img_s": round(args.n / s, 1) for k, s in seconds.items()},
                     "embed_vs_classify": round(seconds["classify"] / seconds["embed"], 3),
                     "attention_vs_classify": round(seconds["classify"] / seconds["attention"], 3)})


if __name__ == "__main__":
    main()
