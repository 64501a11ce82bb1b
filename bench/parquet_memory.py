"""Peak worker memory for one parquet shard of a small file and of a file 4x larger (same row groups).

    python -m bench.parquet_memory [--row-group-mb 8] [--small-mb 100] [--large-mb 400]

Each file is one shard (shard_size above its row count), classified in a fresh process by the
in-process shard path (tiny ViT, threads decode). The cells are distinct 500x375 photo JPEGs
(about 50 KB each), stored without dictionary or compression so the file is as large as its
images. The figure is that process's peak resident set: a worker that held the whole file would
grow by the difference in file sizes; one that holds a row group at a time stays flat, about
baseline + 2 row groups (the one being read and the one after it at a boundary).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import bench_dir, build_hf_vit, report, write_photo_jpegs


def write_parquet(path: Path, jpegs: list[bytes], target_mb: int, row_group_mb: int) -> int:
    """A file of about target_mb of JPEG cells in row groups of about row_group_mb; returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_row = sum(len(j) for j in jpegs) / len(jpegs)
    rows, per_group = int(target_mb * 2**20 / per_row), max(1, int(row_group_mb * 2**20 / per_row))
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("jpg", pa.binary())]),
                          compression="none", use_dictionary=False) as writer:
        for start in range(0, rows, per_group):
            ids = range(start, min(rows, start + per_group))
            writer.write_table(pa.table({"key": [f"{i:09d}" for i in ids],
                                         "jpg": [jpegs[i % len(jpegs)] for i in ids]}))
    return rows


def child(path: str, model: str, out: str) -> None:
    """Run the one shard here; print the resident set before it and its peak while it ran (MiB)."""
    from orchestrator.config import Settings
    from orchestrator.jobspec.jobs import parse_spec
    from workers.context import WorkerContext
    from workers.inprocess import run_local
    from workers.models import load

    ctx = WorkerContext(Settings())
    spec = parse_spec({"kind": "classify", "input": path, "output": out, "model": model, "device": "cpu",
                       "shard_size": 1_000_000, "batch_size": 64, "decode": "threads", "id_column": "key"})
    load(spec.model, device="cpu", settings=ctx.settings, store=ctx.store)  # imports and a model, as a warm worker has them
    before = current_rss_mb()
    peak = [before]
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(peak, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    run_local(spec, ctx)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    print(json.dumps({"rss_before_mb": round(before, 1), "rss_peak_during_mb": round(peak[0], 1),
                      "growth_mb": round(peak[0] - before, 1), "seconds": round(seconds, 2)}))


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def sample(peak: list[float], stop: threading.Event) -> None:
    """The resident set every 5 ms while the shard runs (ru_maxrss keeps the model load's peak)."""
    while not stop.wait(0.005):
        peak[0] = max(peak[0], current_rss_mb())


def measure(path: Path, model: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.parquet_memory", "--child", str(path), str(model), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row-group-mb", type=int, default=8)
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--large-mb", type=int, default=400)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    jpegs = [p.read_bytes() for p in write_photo_jpegs(bench_dir() / "jpegs-500x375-2000", 2000)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_hf_vit(root / "model", hidden=64, layers=2, heads=4, image_size=32, patch=4)
        figures = {"row_group_mb": args.row_group_mb}
        for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
            path = root / name / "data.parquet"
            path.parent.mkdir()
            figures[f"{name}_rows"] = write_parquet(path, jpegs, mb, args.row_group_mb)
            figures[f"{name}_file_mb"] = round(path.stat().st_size / 2**20, 1)
            measured = measure(path, model, root / f"out-{name}")
            figures.update({f"{name}_{k}": v for k, v in measured.items()})
            path.unlink()
        figures["peak_growth_mb"] = round(figures["large_rss_peak_during_mb"] - figures["small_rss_peak_during_mb"], 1)
        figures["file_growth_mb"] = round(figures["large_file_mb"] - figures["small_file_mb"], 1)
    report("parquet_memory", figures)


if __name__ == "__main__":
    main()
