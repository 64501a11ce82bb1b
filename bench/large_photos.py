"""Issue 37: exact decoding of large photos against Daft, with `--jpeg-decode fast` beside it.

    python -m bench.large_photos [--n 500] [--rounds 2] [--daft-path ~/.cache/vitbatch/daft-target]
                                 [--cosine-every 5]

The photos: `--n` JPEGs of 4000x3000 (12 megapixels, a phone camera's size), built once and
deterministically from scikit-image's bundled photos (astronaut, coffee, chelsea, rocket, the
Hubble deep field, immunohistochemistry, retina): each a random crop of one photo, flipped or
not, scaled up to 4000x3000 (bicubic), with a fixed film grain added so that the JPEG holds a
photo's detail rather than an upscale's smooth ramps, saved at quality 85-95. Cached under
~/.cache/vitbatch/bench/jpegs-4000x3000-N.

The model and systems are bench.peers' (HF ViT-Tiny/16 at 224, random weights): each system a
fresh process timed whole, one after the other under bench.peers' exclusive CPU lock:

- vitbatch exact: `vitbatch run classify --input DIR --output OUT --model DIR --overwrite`, its
  defaults (every JPEG decoded at full scale, as the checkpoint's own library reads it);
- daft bf16: Daft's native download / decode_image / resize and a class UDF for the model
  (bench.peers' child); Daft decodes at full scale too;
- vitbatch fast: the same command with `--jpeg-decode fast` (PIL's draft: a DCT-scaled decode).

`--rounds 2` runs the series twice, the second in the reverse order. Printed per system: wall
seconds, images/s, vitbatch exact's speed-up over it, and top-1 agreement with vitbatch exact.
The cosine of fast against exact is the model's `cls` embedding of every `--cosine-every`-th
photo decoded both ways (workers.decode.preprocess.Decoder, the model as a worker loads it,
under the same autocast as workers.compute), measured in this process after the timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from bench.peers import DEFAULT_DAFT_PATH, LOCK, CpuLock, run_peer, run_vitbatch

SIZE = (4000, 3000)  # width, height
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SYSTEMS = (("vitbatch exact", ()), ("daft bf16", None), ("vitbatch fast", ("--jpeg-decode", "fast")))


def _grain(seed: int) -> np.ndarray:
    """A fixed tile of film grain (int16, sigma 6 levels), tiled over each photo."""
    return np.random.default_rng(seed).normal(0, 6, (750, 1000, 3)).round().astype(np.int16)


def write_large_jpegs(dest: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct 4000x3000 JPEGs from scikit-image's photos (deterministic; cached in dest)."""
    import skimage.data

    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    photos = [Image.fromarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]
    grain = np.tile(_grain(seed), (SIZE[1] // 750, SIZE[0] // 1000, 1))
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.6, 0.95)
        w, h = int(photo.width * scale), int(photo.width * scale * SIZE[1] / SIZE[0])
        h = min(h, photo.height)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        big = photo.crop((left, top, left + w, top + h)).resize(SIZE, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            big = big.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.clip(np.asarray(big, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        path = dest / f"photo-{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=rng.randint(85, 95))
        paths.append(path)
    return paths


def fast_cosines(model_dir: Path, paths: list[Path]) -> dict:
    """The cls embedding of each photo decoded exactly and fast: min and mean cosine, and how far apart
    the model-sized pixels are (mean absolute difference in grey levels)."""
    import torch

    from orchestrator.config import Settings
    from orchestrator.jobspec.modelrefs import normalize_model_ref
    from orchestrator.store.storage import ObjectStore
    from workers import models
    from workers.decode.preprocess import Decoder

    settings = Settings()
    model = models.load(normalize_model_ref(str(model_dir)), device="cpu", precision="auto", settings=settings,
                        store=ObjectStore(settings))
    mean = torch.tensor(model.prep.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.prep.std).view(1, 3, 1, 1) * 255
    exact, fast = Decoder(model.prep, settings.max_pixels), Decoder(model.prep, settings.max_pixels, fast=True)

    def embed(pixels: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        autocast = model.dtype != torch.float32  # as workers.compute runs it on a CPU
        with torch.inference_mode(), torch.autocast("cpu", dtype=model.dtype, enabled=autocast):
            return model.family.embed(batch).image.float()

    cosines, level_diffs = [], []
    for start in range(0, len(paths), 16):
        chunk = [p.read_bytes() for p in paths[start:start + 16]]
        a, b = [exact.decode(d) for d in chunk], [fast.decode(d) for d in chunk]
        level_diffs += [float(np.abs(x.astype(np.int16) - y).mean()) for x, y in zip(a, b)]
        cosines += torch.nn.functional.cosine_similarity(embed(a), embed(b)).tolist()
    return {"images": len(cosines), "min_cosine": round(min(cosines), 6), "mean_cosine": round(statistics.mean(cosines), 6),
            "mean_abs_level_diff": round(statistics.mean(level_diffs), 3), "precision": str(model.dtype)}


def _run(name: str, extra, image_dir: Path, model_dir: Path, work: Path, daft_args) -> dict:
    from bench.common import bench_dir

    if extra is None:
        return run_peer("daft", "bf16", image_dir, model_dir, daft_args, work)
    out = bench_dir() / f"out-large-{name.replace(' ', '-')}"
    return run_vitbatch(image_dir, model_dir, out, work, extra=extra, log_name=name.replace(" ", "-"))


def _table(results: dict, n: int) -> list[dict]:
    exact = results.get("vitbatch exact", {})
    rows = []
    print(f"\n{'system':<16} {'wall s':>8} {'img/s':>7} {'exact vs it':>11} {'top-1 = exact':>13}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<16} FAILED ({r['error'].splitlines()[0][:80]})")
            rows.append({"system": name, "error": r["error"]})
            continue
        same = sum(r["labels"].get(k) == v for k, v in exact.get("labels", {}).items())
        agree = same / max(len(exact.get("labels", {})), 1)
        speedup = r["wall_s"] / exact["wall_s"] if "wall_s" in exact else float("nan")
        row = {"system": name, "wall_s": round(r["wall_s"], 2), "img_s": round(n / r["wall_s"], 2),
               "exact_speedup_over_it": round(speedup, 3), "top1_same_as_exact": round(agree, 4),
               "load_1min_before": round(r["load_1min_before"], 2)}
        for key in ("work_s", "success_wall_s", "stage_seconds"):
            if r.get(key) is not None:
                row[key] = r[key] if key == "stage_seconds" else round(r[key], 2)
        rows.append(row)
        print(f"{name:<16} {row['wall_s']:>8.1f} {row['img_s']:>7.2f} {speedup:>10.2f}x {agree:>13.2%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="the second round runs the systems in reverse order")
    parser.add_argument("--daft-path", type=Path, default=DEFAULT_DAFT_PATH)
    parser.add_argument("--cosine-every", type=int, default=5, help="fast vs exact cosine on every k-th photo")
    parser.add_argument("--lock", default=LOCK)
    args = parser.parse_args()

    from bench.common import VIT_TINY, bench_dir, build_hf_vit, cpu_info, report

    if not (args.daft_path / "daft").is_dir():
        parser.error(f"no daft in {args.daft_path}: pip install --target {args.daft_path} daft==0.7.26 "
                     "'pyarrow<26' 'tqdm<4.68'")
    root = bench_dir()
    image_dir = root / f"jpegs-{SIZE[0]}x{SIZE[1]}-{args.n}"
    paths = write_large_jpegs(image_dir, args.n)
    if len(list(image_dir.glob("*.jpg"))) != args.n:
        raise SystemExit(f"{image_dir} must hold exactly {args.n} JPEGs")
    model_dir = build_hf_vit(root / "vit-tiny-16-224", **VIT_TINY)
    for p in paths:  # page cache warm for every system alike
        p.read_bytes()
    work = root / f"large-{args.n}"
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']}, {os.cpu_count()} cores: {cpu['cpu_kind']}; {args.n} JPEGs of {SIZE[0]}x{SIZE[1]}, "
          f"{sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB", flush=True)
    daft_args = SimpleNamespace(device="cpu", batch_size=32, daft_path=args.daft_path)
    per_round = []
    with CpuLock(args.lock):
        for i in range(args.rounds):
            order = SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]
            results: dict[str, dict] = {}
            for name, extra in order:
                print(f"round {i + 1}: {name} ... (load {os.getloadavg()[0]:.2f})", flush=True)
                try:
                    results[name] = _run(name, extra, image_dir, model_dir, work, daft_args)
                except Exception as e:  # one broken system must not lose the others' figures
                    print(f"  FAILED: {e}", flush=True)
                    results[name] = {"error": str(e)[-2000:]}
                    continue
                print(f"  {results[name]['wall_s']:.1f} s", flush=True)
            per_round.append(_table(results, args.n))
    cosine = fast_cosines(model_dir, paths[::args.cosine_every])
    print(f"fast vs exact, cls embedding of {cosine['images']} photos: min cosine {cosine['min_cosine']}, "
          f"mean {cosine['mean_cosine']}; model-sized pixels {cosine['mean_abs_level_diff']} grey levels apart")
    summary = {"images": args.n, "size": SIZE, **cpu, "rounds": per_round, "fast_vs_exact": cosine}
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    report("large_photos", summary)


if __name__ == "__main__":
    main()
