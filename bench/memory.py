"""Benchmark 3: peak worker memory for a 20,000-image job vs a 2,000-image job (target: at most 1.2x).

    python bench/memory.py

Each job runs on a fresh embedded stack with one worker process; the figure is that
process's peak resident set (VmHWM). Streaming shards means nothing accumulates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import bench_dir, build_hf_vit, report, write_photo_jpegs


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def run_job(image_dir: Path, n: int, model: Path, out: Path) -> float:
    from orchestrator.jobspec.jobs import parse_spec
    from orchestrator.stack.embedded import EmbeddedStack
    from orchestrator.submission.submit import Client

    with EmbeddedStack(workers=1) as stack:
        client = Client.from_settings(stack.settings)
        manifest = image_dir / f"first-{n}.txt"
        manifest.write_text("".join(p.name + "\n" for p in sorted(image_dir.glob("*.jpg"))[:n]))
        spec = parse_spec({"kind": "classify", "input": str(manifest), "output": str(out),
                           "model": str(model), "shard_size": 1000, "batch_size": 64})
        job_id, _ = client.submit(spec)
        status = client.wait(job_id, timeout_s=3600)
        assert status.state.value == "succeeded", status
        return peak_rss_mb(stack.processes[0].pid)


def main() -> None:
    root = bench_dir()
    image_dir = root / "jpegs-128x96-20000"
    write_photo_jpegs(image_dir, 20_000, size=(128, 96))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_hf_vit(Path(tmp) / "model", hidden=64, layers=4, heads=4, image_size=32, patch=4)
        small = run_job(image_dir, 2_000, model, Path(tmp) / "out-2k")
        large = run_job(image_dir, 20_000, model, Path(tmp) / "out-20k")
    report("memory", {"peak_rss_mb_2k": round(small, 1), "peak_rss_mb_20k": round(large, 1),
                      "ratio": round(large / small, 3), "target_ratio": 1.2})


if __name__ == "__main__":
    main()
