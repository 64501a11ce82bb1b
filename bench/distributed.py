"""Benchmark 2: the distributed path (Redis, S3-compatible server, a worker process) vs the
in-process pipeline on the same shard (target: at least 0.9x).

    python bench/distributed.py [--n 1000]

Both read the same JPEGs from moto's S3 server. The worker is warmed with one small job
first, so the figure compares steady-state work, not process start-up.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import bench_dir, build_hf_vit, report, run_in_process, write_photo_jpegs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.stack.embedded import EmbeddedStack
    from orchestrator.stack.processes import free_port
    from orchestrator.submission.submit import Client
    from workers.context import WorkerContext

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    root = bench_dir()
    paths = write_photo_jpegs(root / f"jpegs-500x375-{args.n}", args.n)
    model = build_hf_vit(root / "vit-tiny-16-224", hidden=192, layers=12, heads=3)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    for p in paths:
        s3.upload_file(str(p), "bench", f"in/{p.name}")
        if p == paths[9]:
            warm_keys = [q.name for q in paths[:10]]
    settings = Settings(s3_endpoint_url=endpoint)
    base = {"kind": "classify", "input": "s3://bench/in/", "model": str(model), "shard_size": args.n}
    t = {}
    ctx = WorkerContext(settings)
    spec = parse_spec({**base, "output": "s3://bench/out-inprocess/"})
    t["in_process_s"], _ = run_in_process(ctx, spec)
    with EmbeddedStack(workers=1, settings=settings) as stack:
        client = Client.from_settings(stack.settings)
        s3.put_object(Bucket="bench", Key="in/warm.txt", Body="".join(k + "\n" for k in warm_keys).encode())
        job_id, _ = client.submit(parse_spec({**base, "input": "s3://bench/in/warm.txt", "output": "s3://bench/out-warm/"}))
        client.wait(job_id, timeout_s=600, poll_s=0.05)
        start = time.perf_counter()
        job_id, _ = client.submit(parse_spec({**base, "output": "s3://bench/out-distributed/"}))
        status = client.wait(job_id, timeout_s=3600, poll_s=0.05)
        t["distributed_s"] = time.perf_counter() - start
        assert status.state.value == "succeeded", status
    moto.stop()
    report("distributed", {"images": args.n, "in_process_img_s": round(args.n / t["in_process_s"], 1),
                           "distributed_img_s": round(args.n / t["distributed_s"], 1),
                           "ratio": round(t["in_process_s"] / t["distributed_s"], 3), "target_ratio": 0.9})


if __name__ == "__main__":
    main()
