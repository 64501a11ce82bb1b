"""`vitbatch run` on a tiny job, N times in a row beside CPU load, counting exit codes: every run
must exit 0 (issue 33: about one run in 60 died by SIGABRT at exit after its job had published).

    python -m bench.exit_stress [--runs 100] [--images 8] [--load 1] [--workers 1]

Each run is a fresh `vitbatch` process with no broker (embedded Redis and workers), a digits
classify job into its own output; `--load` busy processes run beside it the whole time, so the
command's exit races other work for the cores. Prints the exit-code counts, the runs that did
not exit 0 (with their stderr's tail) and the CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import bench_dir, build_hf_vit, report


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _run_once(root: Path, index: int, model: Path, images: Path, workers: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}  # embedded: no broker
    env["VITBATCH_MODEL_CACHE_DIR"] = str(root / "model-cache")
    args = ["run", "classify", "--input", str(images), "--output", str(root / "out" / f"run-{index:04d}"),
            "--model", str(model), "--workers", str(workers)]
    return subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)


def main() -> None:
    from orchestrator.stack.demo import write_digits

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--load", type=int, default=1, help="busy processes beside the runs")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    root = bench_dir() / "exit_stress"
    images = root / "digits"
    if not images.exists():
        write_digits(images, limit=args.images)
    model = build_hf_vit(root / "vit", hidden=32, layers=1, heads=2, image_size=32, patch=8)
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for proc in load:
        proc.start()
    codes: Counter[int] = Counter()
    bad: list[str] = []
    started = time.monotonic()
    try:
        for index in range(args.runs):
            result = _run_once(root, index, model, images, args.workers)
            codes[result.returncode] += 1
            if result.returncode != 0:
                bad.append(f"run {index}: exit {result.returncode}\n{result.stderr[-1500:]}")
            print(f"run {index + 1}/{args.runs}: exit {result.returncode}", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for proc in load:
            proc.join()
    for line in bad:
        print(line, file=sys.stderr)
    report("exit_stress", {"runs": args.runs, "exit_codes": dict(codes), "load_processes": args.load,
                           "wall_s": round(time.monotonic() - started, 1)})


if __name__ == "__main__":
    main()
