"""The model's own rate on this machine: what no pipeline can beat, for judging a system's share of it.

    python -m bench.model_rate --model-dir DIR [--workers 2] [--batches 8,16,32,64] [--seconds 6] [--compile]

Ready tensors (random normalized pixels at the model's input size), the precision
`--precision auto` resolves to on this CPU (bf16 autocast where the CPU has AMX or
AVX512-BF16, else fp32), the threads the embedded workers use: `--workers` processes side by
side, each with cores / workers compute threads, as `vitbatch run` starts them. For each batch
size every process runs warm-up passes, then as many passes as fit in `--seconds`; the rate
is the sum over processes. Prints one JSON line: the CPU model, flags and kind, and the rates.
`--compile`: the model torch.compile'd as a job's worker compiles it (one static graph per
batch size, compiled during the warm-up passes, outside the measured window).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _one_process(model_dir: str, batch: int, threads: int, seconds: float, start_at: float, queue,
                 compile: bool = False) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from orchestrator.config import Settings
    from orchestrator.jobspec.modelrefs import normalize_model_ref
    from orchestrator.store.storage import ObjectStore
    from workers import models

    torch.set_num_threads(threads)
    settings = Settings()
    model = models.load(normalize_model_ref(model_dir), device="cpu", precision="auto", settings=settings,
                        store=ObjectStore(settings), compile=compile)
    pixels = torch.randn(batch, 3, *model.input_size)
    autocast = model.dtype != torch.float32  # as workers/compute.py runs it on a CPU
    with torch.inference_mode(), torch.autocast("cpu", dtype=model.dtype, enabled=autocast):
        for _ in range(2):
            model.family.logits(pixels)
        while time.time() < start_at:  # every process measures the same wall window
            time.sleep(0.01)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.family.logits(pixels)
            done += batch
        queue.put(done / (time.perf_counter() - t0))


def model_rate(model_dir: str, workers: int, batches: list[int], seconds: float, compile: bool = False) -> dict:
    """{"best_batch", "images_per_s", "per_batch": {batch: img/s}, "precision", "workers", "threads", "compiled"}."""
    import torch

    from workers.models import resolve_dtype

    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    per_batch = {}
    ctx = mp.get_context("spawn")
    for batch in batches:
        queue = ctx.Queue()
        # time for every process to import torch and load (and compile: a minute with a cold cache) the model
        start_at = time.time() + (100.0 if compile else 25.0)
        procs = [ctx.Process(target=_one_process, args=(model_dir, batch, threads, seconds, start_at, queue, compile))
                 for _ in range(workers)]
        for p in procs:
            p.start()
        rates = [queue.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        per_batch[batch] = round(sum(rates), 2)
    best = max(per_batch, key=per_batch.get)
    precision = {torch.bfloat16: "bf16 autocast", torch.float32: "fp32"}[resolve_dtype("auto", torch.device("cpu"))]
    return {"best_batch": best, "images_per_s": per_batch[best], "per_batch": per_batch, "precision": precision,
            "workers": workers, "threads": threads, "compiled": compile}


def main() -> None:
    from bench.common import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as a worker does")
    args = parser.parse_args()
    report("model_rate", model_rate(args.model_dir, args.workers, [int(b) for b in args.batches.split(",")],
                                    args.seconds, args.compile))


if __name__ == "__main__":
    main()
