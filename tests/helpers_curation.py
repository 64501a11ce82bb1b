"""A real-image set with known near-duplicates, for dedup and neighbors tests.

Distinct images: scikit-image's bundled photos, its 200 LFW faces and scikit-learn's digits
(all shipped inside the wheels: no download). Near-duplicates of some of them: re-encoded at
other JPEG qualities, resized, slightly cropped, flipped.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PHOTOS = ["astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
          "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
          "text", "colorwheel", "clock", "cat"]


def distinct_images(n_faces: int = 60, n_digits: int = 60) -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_digits

    images = {}
    for name in PHOTOS:
        array = getattr(data, name)()
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).astype(np.uint8) if array.max() <= 1 else array.astype(np.uint8)
        images[f"photo-{name}"] = Image.fromarray(array).convert("RGB")
    for i, face in enumerate(data.lfw_subset()[:n_faces]):
        images[f"face-{i:03d}"] = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((64, 64))
    for i, digit in enumerate(load_digits().images[:n_digits]):
        images[f"digit-{i:04d}"] = Image.fromarray((digit * 16).astype(np.uint8)).convert("RGB").resize((48, 48))
    return images


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def variants(image: Image.Image) -> dict[str, bytes]:
    """Near-duplicates: other JPEG qualities, resized, cropped by 3% a side, mirrored."""
    w, h = image.size
    dx, dy = max(1, w * 3 // 100), max(1, h * 3 // 100)
    return {"q60": jpeg(image, 60), "q30": jpeg(image, 30), "resized": jpeg(image.resize((w * 4 // 5, h * 4 // 5)), 90),
            "cropped": jpeg(image.crop((dx, dy, w - dx, h - dy)), 90), "flipped": jpeg(ImageOps.mirror(image), 90)}


def write_set(folder: Path, every: int = 4) -> dict[str, str]:
    """Write the distinct images (JPEG q95) and the variants of every `every`-th one; returns
    variant key -> original key (the planted pairs)."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = {}
    for i, (name, image) in enumerate(distinct_images().items()):
        (folder / f"{name}.jpg").write_bytes(jpeg(image, 95))
        if i % every:
            continue
        for how, data in variants(image).items():
            (folder / f"{name}-{how}.jpg").write_bytes(data)
            planted[f"{name}-{how}.jpg"] = f"{name}.jpg"
    return planted


def clustered_vectors(n: int, dim: int, seed: int, per_cluster: int = 50) -> np.ndarray:
    """float16 rows around n / per_cluster random directions, as embeddings of a real image set gather."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (centres[rng.integers(0, len(centres), n)] + noise).astype(np.float16)


def write_vectors(output: str, vectors: np.ndarray, part_rows: int, name: str = "v",
                  fingerprint: str = "f" * 64, store=None) -> list[str]:
    """An embed job's output holding `vectors` as its cls array, `part_rows` per shard, written as the
    embed job writes it (index parquet with `vitbatch.arrays`, cls npy parts, markers, _SUCCESS.json)
    but without a model: for neighbors tests at sizes no model run affords. Returns the keys in order."""
    import json
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator import __version__
    from orchestrator.config import Settings
    from orchestrator.lifecycle.commits import JobRecord, JobStamp, ShardWork
    from orchestrator.published.outputs import job_dir, new_job_id
    from orchestrator.published.publication import publish
    from orchestrator.store.storage import ObjectStore, normalize_uri, relative_key
    from workers.writers import commit_shard

    store, output = store or ObjectStore(Settings()), normalize_uri(output)
    described = {"cls": {"source": "cls_token", "projected": False, "normalized": False, "dtype": "float16",
                         "family": "hf", "model_fingerprint": fingerprint}}
    schema = pa.schema([("key", pa.string()), ("etag", pa.string()), ("shard", pa.int32()), ("row", pa.int32()),
                        ("error", pa.string())]).with_metadata({"vitbatch.arrays": json.dumps(described)})
    job_id = new_job_id()
    folder = job_dir(output, job_id)
    keys = [f"{name}-{i:07d}.jpg" for i in range(len(vectors))]
    markers = []
    for shard, start in enumerate(range(0, len(vectors), part_rows)):
        part_keys = keys[start:start + part_rows]
        table = pa.table({"key": part_keys, "etag": ["e"] * len(part_keys), "shard": [shard] * len(part_keys),
                          "row": list(range(len(part_keys))), "error": [None] * len(part_keys)}, schema=schema)
        index, array = io.BytesIO(), io.BytesIO()
        pq.write_table(table, index)
        np.save(array, vectors[start:start + part_rows].astype(np.float16), allow_pickle=False)
        markers.append(commit_shard(store, folder, shard, {f"part-{shard:05d}.parquet": index.getvalue(),
                                                           f"cls/part-{shard:05d}.npy": array.getvalue()},
                                    JobStamp(job_id), ShardWork(rows=len(part_keys), model_fingerprint=fingerprint)))
    record = JobRecord.build(job_id=job_id, spec_sha256="sha256:" + "0" * 64, kind="embed",
                             job_dir=relative_key(output, folder), markers=markers, items=len(keys),
                             processed=len(keys), errors=0, shards=len(markers), failed_shards={}, carried=0,
                             wall_s=0.0, finished_at=time.time(), version=__version__)
    publish(store, output, record, True, {})
    return keys


def chain(image: Image.Image, steps: int) -> list[bytes]:
    """A re-encoded, that re-encoded again, ...: each step decodes the previous JPEG, trims a 2% border
    and re-encodes it at quality 50, so each step is near the one before and drifts from the first."""
    out, current = [], image
    for _ in range(steps):
        w, h = current.size
        dx, dy = max(1, w // 50), max(1, h // 50)
        out.append(jpeg(current.crop((dx, dy, w - dx, h - dy)).resize((w, h)), 50))
        current = Image.open(io.BytesIO(out[-1])).convert("RGB")
    return out


def write_chains(folder: Path, steps: int = 6, every: int = 3) -> dict[str, list[str]]:
    """Write the distinct images (JPEG q95) and a chain of `steps` re-encodings of every `every`-th;
    returns first key -> its chain's keys in order."""
    folder.mkdir(parents=True, exist_ok=True)
    chains = {}
    for i, (name, image) in enumerate(distinct_images().items()):
        (folder / f"{name}.jpg").write_bytes(jpeg(image, 95))
        if i % every:
            continue
        links = chain(image, steps)
        for step, data in enumerate(links, 1):
            (folder / f"{name}-step{step}.jpg").write_bytes(data)
        chains[f"{name}.jpg"] = [f"{name}-step{step}.jpg" for step in range(1, steps + 1)]
    return chains
