"""Benchmark 9: the same classify job through peer systems, each timed as a whole, in one run.

    python -m bench.peers [--n 2000] [--systems plain,pipeline,ray,daft,vitbatch] [--bf16 auto|on|only|off]
                          [--no-baseline] [--rounds 1] [--batch-size 32] [--daft-path ~/.cache/vitbatch/daft-target]
                          [--device cpu|cuda]

`--device cuda` (a lent GPU) puts every peer's model on the GPU with fp32 and fp16 variants
(Ray's actor and Daft's class UDF ask for one GPU); vitbatch's defaults pick the GPU themselves.

The same 500x375 JPEGs (cut from scikit-learn's sample photos) and HF ViT-Tiny/16 at 224
(random weights, classifier scaled so that top-1 is decisive), classified by:

- plain:    ViTImageProcessor + ViTForImageClassification, fp32, batches of 32 PIL images
            (the transformers docs' loop): the baseline, ratio 1.00;
- pipeline: transformers.pipeline("image-classification", model=DIR, batch_size=32), fp32
            (dtype left at its default) and bf16 (dtype=torch.bfloat16);
- ray:      Ray Data: read_images(size=(224, 224), mode="RGB") (Ray's own decode + resize in
            read tasks), then map_batches with a class-based actor UDF (one actor, batch 32)
            that normalizes and runs the model; bf16 by autocast;
- daft:     Daft: from_glob_path, then its native download / decode_image / resize, then a
            @daft.cls batch method (batch 32) for the model; bf16 by autocast;
- vitbatch: the CLI exactly as a user types it,
            `vitbatch run classify --input DIR --output OUT --model MODEL_DIR --overwrite`
            (its defaults: embedded Redis, one worker per core, --precision auto), start-up included.

Each system runs in a fresh subprocess (its imports, start-up and model load count, as a user
sees them), one after the other, while this script holds an exclusive flock on
/tmp/vitbatch-cpu.lock for the whole series (others hold it shared while they run tests; it
waits up to 900 s for it), so the runs overlap neither with the test suite nor each other.
Printed per system: wall seconds of the whole subprocess, images/s, ratio to the plain fp32
loop, and top-1 agreement with the plain fp32 loop on decisive images (its top-2 probability
margin > 0.05); for vitbatch also the `wall_s`, `images_per_s` and `stage_seconds` of its
`_SUCCESS.json`. bf16 variants of the peers run only where the CPU has amx_bf16 or avx512_bf16
(`--bf16 auto`); on AVX2-only CPUs bf16 is emulated and slower than fp32, so there the peers
run fp32 only (the script says so); `--bf16 on` forces them, `--bf16 off` skips them, `--bf16 only`
runs no fp32 variant of a peer. `--no-baseline` leaves the plain loop out (at 20,000 images it
alone takes a quarter of an hour): walls and vitbatch's speed-up over the best peer, no agreement.

Peers are not worker dependencies. Setup (once; PyPI or this machine's wheel mirror only):

    python3.11 -m venv ~/.cache/vitbatch/peers-venv
    ~/.cache/vitbatch/peers-venv/bin/python -m pip install --upgrade pip setuptools wheel
    ~/.cache/vitbatch/peers-venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 \\
        -e '.[worker,bench]' scikit-learn==1.9.1          # bench extra = ray[data]==2.60.0
    # daft 0.7.26 needs pyarrow<26 and tqdm<4.68 (the project pins pyarrow 26): its own folder,
    # prepended to PYTHONPATH of the daft subprocess only
    ~/.cache/vitbatch/peers-venv/bin/python -m pip install --target ~/.cache/vitbatch/daft-target \\
        daft==0.7.26 'pyarrow<26' 'tqdm<4.68'
    ~/.cache/vitbatch/peers-venv/bin/python -m bench.peers --n 2000

`--rounds N` runs the whole series N times, each round starting one system later (a machine
whose speed drifts over minutes, as a shared one does, then favours no system), prints each
round's table with vitbatch's speed-up over that round's fastest peer, and ends with each
system's median wall and the median of those per-round speed-ups.

Data and model are cached under ~/.cache/vitbatch/bench (VITBATCH_BENCH_DIR).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/vitbatch-cpu.lock"
SYSTEMS = ("plain", "pipeline", "ray", "daft", "vitbatch")
DEFAULT_DAFT_PATH = Path.home() / ".cache" / "vitbatch" / "daft-target"


# ---------------------------------------------------------------------------------------------
# children: each runs one system in its own process and writes {labels, [margins], phases, ...}
# ---------------------------------------------------------------------------------------------

def _normalizer(model_dir: str):
    """(mean, std, rescale) of the model's image processor, as tensors for NCHW batches."""
    import torch
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor.from_pretrained(model_dir)
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std, float(processor.rescale_factor)


def _autocast(precision: str, device: str):
    """bf16 autocast on the CPU, fp16 on CUDA, or nothing for fp32."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def child_plain(image_dir: str, model_dir: str, batch_size: int, precision: str, device: str, phases: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    phases["imported"] = time.time()
    processor = ViTImageProcessor.from_pretrained(model_dir)
    model = ViTForImageClassification.from_pretrained(model_dir).eval().to(device)
    phases["model_loaded"] = time.time()
    paths = sorted(Path(image_dir).glob("*.jpg"))
    labels, margins = {}, {}
    with torch.no_grad(), _autocast(precision, device):
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = [Image.open(p).convert("RGB") for p in chunk]
            pixels = processor(images, return_tensors="pt")["pixel_values"].to(device)
            probs = model(pixel_values=pixels).logits.float().softmax(-1).cpu().numpy()
            top = np.sort(probs, axis=-1)[:, -2:]
            for p, label, margin in zip(chunk, probs.argmax(-1), top[:, 1] - top[:, 0]):
                labels[p.name], margins[p.name] = int(label), float(margin)
    return {"labels": labels, "margins": margins, "torch_threads": torch.get_num_threads()}


def child_pipeline(image_dir: str, model_dir: str, batch_size: int, precision: str, device: str, phases: dict) -> dict:
    import torch
    from transformers import pipeline

    phases["imported"] = time.time()
    kwargs = {} if precision == "fp32" else {"dtype": torch.float16 if precision == "fp16" else torch.bfloat16}
    classifier = pipeline("image-classification", model=model_dir, batch_size=batch_size, device=device, **kwargs)
    phases["model_loaded"] = time.time()
    paths = [str(p) for p in sorted(Path(image_dir).glob("*.jpg"))]
    label2id = classifier.model.config.label2id
    out = classifier(paths, top_k=1)
    labels = {Path(p).name: int(label2id[preds[0]["label"]]) for p, preds in zip(paths, out)}
    return {"labels": labels, "torch_threads": torch.get_num_threads(),
            "image_processor": type(classifier.image_processor).__name__,
            "model_dtype": str(classifier.model.dtype)}


class _Classifier:
    """The model as a callable over {"image": uint8 NHWC} batches (Ray's and Daft's class UDF body)."""

    def __init__(self, model_dir: str, precision: str, device: str):
        import torch
        from transformers import ViTForImageClassification

        # Ray sets OMP_NUM_THREADS to the actor's reserved CPUs (1); the model is the bottleneck,
        # so give it every core as the plain loop has (decode tasks share them).
        torch.set_num_threads(os.cpu_count() or 1)
        self.model = ViTForImageClassification.from_pretrained(model_dir).eval().to(device)
        mean, std, self.scale = _normalizer(model_dir)
        self.mean, self.std = mean.to(device), std.to(device)
        self.precision, self.device = precision, device

    def predict(self, images):
        import torch

        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().mul_(self.scale)
        x = (x - self.mean) / self.std
        with torch.inference_mode(), _autocast(self.precision, self.device):
            logits = self.model(pixel_values=x).logits
        return logits.float().argmax(-1).cpu().numpy()


def child_ray(image_dir: str, model_dir: str, batch_size: int, precision: str, device: str, phases: dict) -> dict:
    import ray

    phases["imported"] = time.time()
    ray.init(include_dashboard=False, log_to_driver=False)
    phases["engine_started"] = time.time()

    class RayClassifier(_Classifier):
        def __call__(self, batch: dict) -> dict:
            return {"path": batch["path"], "label_id": self.predict(batch["image"])}

    ds = ray.data.read_images(image_dir, size=(224, 224), mode="RGB", include_paths=True)
    preds = ds.map_batches(RayClassifier, fn_constructor_args=(model_dir, precision, device), batch_size=batch_size,
                           batch_format="numpy", num_cpus=1, num_gpus=1 if device == "cuda" else 0,
                           compute=ray.data.ActorPoolStrategy(size=1))
    rows = preds.take_all()
    labels = {Path(r["path"]).name: int(r["label_id"]) for r in rows}
    ray.shutdown()
    return {"labels": labels, "ray": ray.__version__}


def child_daft(image_dir: str, model_dir: str, batch_size: int, precision: str, device: str, phases: dict) -> dict:
    import daft
    import numpy as np
    from daft import DataType, col
    from daft.functions import decode_image, download, resize

    phases["imported"] = time.time()

    @daft.cls(max_concurrency=1, gpus=1 if device == "cuda" else 0)
    class DaftClassifier(_Classifier):
        @daft.method.batch(return_dtype=DataType.int64(), batch_size=batch_size)
        def classify(self, images: daft.Series):
            return self.predict(np.stack(images.to_pylist()))

    classifier = DaftClassifier(model_dir, precision, device)
    df = daft.from_glob_path(f"{image_dir}/*.jpg")
    df = df.with_column("image", resize(decode_image(download(col("path")), mode="RGB"), 224, 224))
    df = df.with_column("label_id", classifier.classify(col("image")))
    out = df.select("path", "label_id").to_pydict()
    labels = {Path(p).name: int(label) for p, label in zip(out["path"], out["label_id"])}
    return {"labels": labels, "daft": daft.__version__, "pyarrow_from": __import__("pyarrow").__file__}


CHILDREN = {"plain": child_plain, "pipeline": child_pipeline, "ray": child_ray, "daft": child_daft}


def run_child(args) -> None:
    phases = {"started": time.time()}
    result = CHILDREN[args.child](args.images, args.model, args.batch_size, args.precision, args.device, phases)
    phases["done"] = time.time()
    Path(args.result).write_text(json.dumps({**result, "phases": phases}))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

class CpuLock:
    """Exclusive flock on LOCK for one timed run (others hold it shared while they run tests)."""

    def __init__(self, path: str = LOCK, timeout_s: float = 900):
        self.path, self.timeout_s = path, timeout_s
        self.waited_s = 0.0

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > self.timeout_s:
                    os.close(self.fd)
                    raise TimeoutError(f"{self.path} still held by others after {self.timeout_s:.0f} s") from None
                time.sleep(0.5)
        self.waited_s = time.monotonic() - start
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def timed_subprocess(cmd: list[str], env: dict, log: Path) -> dict:
    """Run cmd (the caller holds the CPU lock); wall seconds of the whole process, from spawn to exit."""
    with open(log, "wb") as out:
        load = os.getloadavg()[0]
        spawned = time.time()
        start = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {rc}; last lines of {log}:\n{tail}")
    return {"wall_s": wall, "spawned": spawned, "load_1min_before": load}


def peer_env(system: str, daft_path: Path) -> dict:
    env = dict(os.environ)
    if system == "daft":
        env["PYTHONPATH"] = os.pathsep.join([str(daft_path), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("DAFT_PROGRESS_BAR", "0")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return env


def run_peer(system: str, precision: str, image_dir: Path, model_dir: Path, args, work: Path) -> dict:
    result_path = work / f"{system}-{precision}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.peers", "--child", system, "--precision", precision, "--device", args.device,
           "--images", str(image_dir), "--model", str(model_dir), "--batch-size", str(args.batch_size),
           "--result", str(result_path)]
    timing = timed_subprocess(cmd, peer_env(system, args.daft_path), work / f"{system}-{precision}.log")
    result = json.loads(result_path.read_text())
    phases = result.pop("phases")
    timing["startup_s"] = phases["started"] - timing["spawned"]
    timing["import_s"] = phases["imported"] - phases["started"]
    timing["work_s"] = phases["done"] - phases["imported"]  # engine start + model load + the job
    if "model_loaded" in phases:
        timing["model_load_s"] = phases["model_loaded"] - phases["imported"]
    if "engine_started" in phases:
        timing["engine_start_s"] = phases["engine_started"] - phases["imported"]
    return {**timing, **result}


def vitbatch_command(image_dir: Path, out_dir: Path, model_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    exe = Path(sys.executable).parent / "vitbatch"
    exe = str(exe) if exe.exists() else (shutil.which("vitbatch") or "vitbatch")
    return [exe, "run", "classify", "--input", str(image_dir), "--output", str(out_dir), "--model", str(model_dir),
            "--overwrite", *extra]


def run_vitbatch(image_dir: Path, model_dir: Path, out_dir: Path, work: Path, extra: tuple[str, ...] = (),
                 log_name: str = "vitbatch") -> dict:
    """The CLI as a user types it (its defaults, plus `extra` options), timed whole: its labels and
    its _SUCCESS.json's figures."""
    from orchestrator.constants import SUCCESS_FILE
    from orchestrator.lifecycle.commits import JobRecord
    from orchestrator.published.results import read_table

    env = {k: v for k, v in os.environ.items() if k not in ("VITBATCH_BROKER_URL", "VITBATCH_RESULT_BACKEND")}
    cmd = vitbatch_command(image_dir, out_dir, model_dir, extra)
    print("  $ " + " ".join(cmd), flush=True)
    timing = timed_subprocess(cmd, env, work / f"{log_name}.log")
    record = JobRecord.from_json(json.loads((out_dir / SUCCESS_FILE).read_text()))
    table = read_table(str(out_dir))
    labels = {k: v for k, v, e in zip(table.column("key").to_pylist(), table.column("label_id").to_pylist(),
                                      table.column("error").to_pylist()) if e is None}
    return {**timing, "labels": labels, "success_wall_s": record.wall_s,
            "success_images_per_s": record.images_per_s, "stage_seconds": record.stage_seconds}


def agreement(reference: dict, margins: dict, labels: dict) -> tuple[float, int, int]:
    decisive = [k for k, m in margins.items() if m > 0.05]
    same = sum(labels.get(k) == reference[k] for k in decisive)
    missing = sum(k not in labels for k in reference)
    return round(same / max(len(decisive), 1), 4), len(decisive), missing


def warm_page_cache(paths) -> None:
    for p in paths:
        p.read_bytes()


def _run_all(runs, results: dict, image_dir: Path, model_dir: Path, args, work: Path) -> None:
    from bench.common import bench_dir

    for system, precision in runs:
        name = f"{system} {precision}"
        print(f"running {name} ...", flush=True)
        try:
            if system == "vitbatch":
                results[name] = run_vitbatch(image_dir, model_dir, bench_dir() / f"out-peers-vitbatch-{args.n}", work)
            else:
                results[name] = run_peer(system, precision, image_dir, model_dir, args, work)
        except Exception as e:  # one broken peer must not lose the others' figures
            print(f"  FAILED: {e}", flush=True)
            results[name] = {"error": str(e)[-2000:]}
            continue
        print(f"  {results[name]['wall_s']:.1f} s ({args.n / results[name]['wall_s']:.1f} img/s)", flush=True)


def _round_rows(results: dict[str, dict], n: int) -> list[dict]:
    """One round's table, printed: wall, img/s, ratio to the plain loop, agreement with it; and
    vitbatch's speed-up over the best peer of the same round."""
    base = results.get("plain fp32")
    if base is not None and "labels" not in base:
        raise SystemExit("the plain fp32 loop failed: no baseline")
    rows = []
    print()
    print(f"{'system':<16} {'wall s':>8} {'img/s':>7} {'ratio':>6} {'top-1 agree':>11}  start/import/work s")
    for name, r in sorted(results.items(), key=lambda item: SYSTEMS.index(item[0].split()[0])):
        if "error" in r:
            print(f"{name:<16} FAILED ({r['error'].splitlines()[0][:80]})")
            rows.append({"system": name, "error": r["error"]})
            continue
        agree, decisive, missing = (agreement(base["labels"], base["margins"], r["labels"]) if base
                                    else (float("nan"), 0, 0))
        row = {"system": name, "wall_s": round(r["wall_s"], 2), "img_s": round(n / r["wall_s"], 1),
               "ratio": round(base["wall_s"] / r["wall_s"], 2) if base else float("nan"), "top1_agreement": agree,
               "decisive": decisive, "missing_rows": missing, "load_1min_before": round(r["load_1min_before"], 2)}
        for key in ("startup_s", "import_s", "engine_start_s", "model_load_s", "work_s"):
            if key in r:
                row[key] = round(r[key], 2)
        for key in ("torch_threads", "image_processor", "model_dtype", "ray", "daft", "success_wall_s",
                    "success_images_per_s", "stage_seconds"):
            if r.get(key) is not None:
                row[key] = r[key]
        rows.append(row)
        split = "/".join(f"{row[k]:.1f}" for k in ("startup_s", "import_s", "work_s") if k in row) or "-"
        print(f"{name:<16} {row['wall_s']:>8.1f} {row['img_s']:>7.1f} {row['ratio']:>6.2f} {agree:>11.2%}  {split}"
              + (f"  (missing {missing})" if missing else ""))
    vb = results.get("vitbatch auto", {})
    if "stage_seconds" in vb:
        print(f"\nvitbatch _SUCCESS.json: wall_s {vb['success_wall_s']}, images_per_s {vb['success_images_per_s']}, "
              f"stage_seconds {json.dumps(vb['stage_seconds'])}")
        job_wall, shard_wall = vb["success_wall_s"] or 0.0, (vb["stage_seconds"] or {}).get("wall_s", 0.0)
        print(f"vitbatch process {vb['wall_s']:.1f} s = {vb['wall_s'] - job_wall:.1f} s before submit and after the "
              f"job (CLI imports, embedded Redis + worker spawn, preview, shutdown) + job {job_wall:.1f} s "
              f"(submit to finish: worker start-up, model load, shards); shard wall summed over shards "
              f"(they run side by side, one per worker) {shard_wall:.1f} s")
    best = best_peer(rows)
    if best is not None:
        print(f"vitbatch vs the best peer of this round ({best[0]}): {best[1]:.2f}x")
    for name, r in results.items():  # the job phase: what is left once each process has started
        if name.startswith("daft") and "work_s" in r and vb.get("success_wall_s"):
            print(f"job phase: vitbatch {vb['success_wall_s']:.1f} s (submit to finish) vs {name} {r['work_s']:.1f} s "
                  f"(after its imports: engine, model load, job): {r['work_s'] / vb['success_wall_s']:.2f}x")
    print(f"decisive images (plain fp32 top-2 margin > 0.05): {rows[0]['decisive'] if base else '- (no baseline)'} "
          f"of {n}\n")
    return rows


def best_peer(rows: list[dict]) -> tuple[str, float] | None:
    """(the fastest other system, vitbatch's speed-up over it), from one round's rows."""
    walls = {row["system"]: row["wall_s"] for row in rows if "wall_s" in row}
    ours = walls.pop("vitbatch auto", None)
    if ours is None or not walls:
        return None
    name = min(walls, key=walls.get)
    return name, round(walls[name] / ours, 3)


def _median_rows(per_round: list[list[dict]]) -> list[dict]:
    """Across rounds: each system's median wall (and its ratio to the median plain loop), and the
    median of vitbatch's per-round speed-up over that round's best peer."""
    measured: dict[str, list[dict]] = {}  # system -> its rows that ran, round by round
    for rows in per_round:
        for row in rows:
            measured.setdefault(row["system"], [])
            if "wall_s" in row:
                measured[row["system"]].append(row)
    plain = statistics.median(row["wall_s"] for row in measured.get("plain fp32") or [{"wall_s": float("nan")}])
    rows = []
    print(f"medians over {len(per_round)} rounds")
    print(f"{'system':<16} {'wall s':>8} {'ratio':>6}  walls per round")
    for name, ran in measured.items():
        if not ran:
            continue
        walls = [row["wall_s"] for row in ran]
        wall = statistics.median(walls)
        rows.append({"system": name, "wall_s": round(wall, 2), "ratio": round(plain / wall, 2), "walls": walls,
                     "top1_agreement": min(row["top1_agreement"] for row in ran)})
        print(f"{name:<16} {wall:>8.1f} {plain / wall:>6.2f}  {' '.join(f'{w:.1f}' for w in walls)}")
    speedups = [best[1] for best in map(best_peer, per_round) if best is not None]
    if speedups:
        print(f"vitbatch vs the best peer, per round: {' '.join(f'{x:.2f}x' for x in speedups)}; "
              f"median {statistics.median(speedups):.2f}x\n")
        rows.append({"system": "vitbatch vs best peer", "per_round": speedups,
                     "median": statistics.median(speedups)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--no-baseline", action="store_true",
                        help="leave out the plain fp32 loop (long at 20,000 images): no ratios to it, no agreement")
    parser.add_argument("--bf16", choices=("auto", "on", "only", "off"), default="auto",
                        help="bf16 variants of the peers: auto = only on AMX/AVX512-BF16 CPUs; only = no fp32 variants")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--daft-path", type=Path, default=DEFAULT_DAFT_PATH,
                        help="pip --target folder holding daft 0.7.26 (+ pyarrow<26, tqdm<4.68)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the series this many times, each round starting one system later; "
                             "prints each round and the medians")
    parser.add_argument("--lock", default=LOCK, help="flock file held exclusively while measuring")
    parser.add_argument("--no-model-rate", action="store_true",
                        help="skip the model-only rate (ready tensors, best batch, the workers' threads)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the peers run their model; cuda adds fp16 variants (a lent GPU; vitbatch's "
                             "defaults pick the GPU themselves)")
    # child mode (internal)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    from bench.common import bench_dir, cpu_info, photos_and_vit, report

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if "plain" not in systems and not args.no_baseline:
        systems.insert(0, "plain")  # the baseline of every ratio and agreement
    if "daft" in systems and not (args.daft_path / "daft").is_dir():
        parser.error(f"no daft in {args.daft_path}: pip install --target {args.daft_path} daft==0.7.26 'pyarrow<26' "
                     "'tqdm<4.68' (or leave daft out of --systems)")
    cpu = cpu_info()
    bf16 = {"auto": cpu["amx_or_avx512_bf16"], "on": True, "only": True, "off": False}[args.bf16] and args.device == "cpu"
    import torch

    print(f"CPU: {cpu['cpu']}, {os.cpu_count()} cores, flags {' '.join(cpu['flags']) or '-'}: {cpu['cpu_kind']}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, batch {args.batch_size}, {args.n} images")
    if args.device == "cuda":
        print("peers run their model on CUDA, fp32 and fp16 (autocast; the pipeline with dtype=float16)")
    elif not bf16:
        print("peers run fp32 only: " + ("--bf16 off" if args.bf16 == "off" else
                                         "this CPU has no amx_bf16/avx512_bf16, bf16 is emulated and slower than fp32"
                                         " (--bf16 on forces the bf16 variants)"))
    elif not cpu["amx_or_avx512_bf16"]:
        print("--bf16 on: bf16 variants forced on a CPU that emulates bf16 (expect them slower than fp32)")

    image_dir, paths, model_dir = photos_and_vit(args.n)
    held = len(list(image_dir.glob("*.jpg")))
    if held != args.n:  # the peers and vitbatch read the whole folder: it must hold exactly n images
        raise SystemExit(f"{image_dir} holds {held} JPEGs, expected {args.n}")
    warm_page_cache(paths)
    work = bench_dir() / f"peers-{args.n}"
    work.mkdir(parents=True, exist_ok=True)

    runs: list[tuple[str, str]] = []
    for system in systems:
        if system in ("plain", "vitbatch"):
            runs.append((system, "fp32" if system == "plain" else "auto"))
        else:
            if args.bf16 != "only":
                runs.append((system, "fp32"))
            if bf16 or args.device == "cuda":
                runs.append((system, "bf16" if args.device == "cpu" else "fp16"))
    rounds: list[dict[str, dict]] = [{} for _ in range(args.rounds)]
    print(f"waiting for an exclusive lock on {args.lock} (held shared while tests run) ...", flush=True)
    lock = CpuLock(args.lock).__enter__()  # held for the whole series: every system measured in the same quiet window
    print(f"  got it after {lock.waited_s:.0f} s", flush=True)
    try:
        rate = None
        if args.device == "cpu" and not args.no_model_rate:  # the ceiling every system is a share of
            from bench.model_rate import model_rate
            from orchestrator.stack.embedded import auto_workers

            rate = model_rate(str(model_dir), auto_workers(), [8, 16, 32, 64], seconds=6.0)
            print(f"model only ({rate['precision']}, {rate['workers']} process(es) x {rate['threads']} thread(s), ready "
                  f"tensors): {rate['images_per_s']:.1f} img/s at batch {rate['best_batch']} {rate['per_batch']}",
                  flush=True)
        for i, results in enumerate(rounds):
            if args.rounds > 1:  # each round starts one system later: a drifting machine favours no one
                print(f"round {i + 1} of {args.rounds}", flush=True)
            _run_all(runs[i % len(runs):] + runs[:i % len(runs)], results, image_dir, model_dir, args, work)
    finally:
        lock.__exit__()

    per_round = [_round_rows(results, args.n) for results in rounds]
    rows = per_round[0] if args.rounds == 1 else _median_rows(per_round)
    if rate is not None:  # each system's share of what the model alone does on these cores
        for row in rows:
            if row.get("img_s"):  # whole command, start-up included
                row["share_of_model_rate"] = round(row["img_s"] / rate["images_per_s"], 3)
            if row.get("success_images_per_s"):  # vitbatch's job alone (submit to finish)
                row["job_share_of_model_rate"] = round(row["success_images_per_s"] / rate["images_per_s"], 3)
            shares = [f"{row[k]:.0%} {what}" for k, what in (("share_of_model_rate", "end to end"),
                                                              ("job_share_of_model_rate", "as the job's images/s"))
                      if k in row]
            if shares:
                print(f"{row['system']:<16} {', '.join(shares)} of the model-only rate")
    summary = {"images": args.n, "batch_size": args.batch_size, "bf16_peers": bf16, **cpu, "torch": torch.__version__,
               "lock_wait_s": round(lock.waited_s, 1), "rounds": args.rounds, "systems": rows, "model_rate": rate,
               **({"per_round": per_round} if args.rounds > 1 else {})}
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    report("peers", summary)


if __name__ == "__main__":
    main()
