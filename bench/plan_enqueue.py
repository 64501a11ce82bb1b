"""Benchmark 4: planning and enqueueing a 100,000-key manifest (target: under 15 s).

    python bench/plan_enqueue.py [--keys 100000]

Uses the embedded Redis-compatible server; no workers run, so the messages stay queued.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import build_hf_vit, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.stack.embedded import EmbeddedStack
    from orchestrator.submission.submit import Client

    with tempfile.TemporaryDirectory() as tmp, EmbeddedStack(workers=0, settings=Settings()) as stack:
        root = Path(tmp)
        manifest = root / "images" / "manifest.txt"
        manifest.parent.mkdir()
        manifest.write_text("".join(f"shard-{i // 10000:02d}/img-{i:07d}.jpg\n" for i in range(args.keys)))
        model = build_hf_vit(root / "model", hidden=64, layers=4, heads=4, image_size=32, patch=4)  # only its config is read
        client = Client.from_settings(stack.settings)
        spec = parse_spec({"kind": "classify", "input": str(manifest), "output": str(root / "out"),
                           "model": str(model), "shard_size": args.shard_size})
        start = time.perf_counter()
        job_id, summary = client.submit(spec)
        elapsed = time.perf_counter() - start
        queued = sum(client.ledger.r.llen(q) for q in ("vitbatch", "vitbatch-interactive"))
        report("plan_enqueue", {"keys": args.keys, "shards": summary["shards"], "queued_messages": queued,
                                "seconds": round(elapsed, 2), "target_s": 15})


if __name__ == "__main__":
    main()
