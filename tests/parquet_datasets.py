"""Parquet datasets as users' libraries write them, for the parquet input tests (unit and integration):
`datasets` (`Dataset.to_parquet` with Image and ClassLabel features, some cells saved by path) and an
img2dataset-shaped shard written with pyarrow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

N = 12


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36 + seed, 44, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def hf_dataset(folder: Path, with_bad_rows: bool = False) -> Path:
    """A `datasets` Image + ClassLabel dataset saved with to_parquet in 5-row row groups; rows 3 and 7 are
    saved by path (bytes null), as a dataset built from files is."""
    from datasets import ClassLabel, Dataset
    from datasets import Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "side").mkdir(exist_ok=True)
    cells, captions = [], []
    for i in range(N):
        if i in (3, 7):
            (folder / "side" / f"p{i}.png").write_bytes(png(i))
            cells.append({"bytes": None, "path": f"side/p{i}.png"})
        else:
            cells.append({"bytes": png(i), "path": None})
        captions.append(f"caption {i}")
    if with_bad_rows:
        cells += [{"bytes": b"<html>not an image</html>", "path": None}, {"bytes": None, "path": "../../etc/passwd"},
                  {"bytes": None, "path": "side/missing.png"}, {"bytes": None, "path": None}]
        captions += ["html", "escape", "missing", "null"]
    data = Dataset.from_dict({"image": cells, "label": [i % 3 for i in range(len(cells))], "caption": captions})
    data = data.cast_column("image", ImageFeature()).cast_column("label", ClassLabel(names=["ant", "bee", "cow"]))
    data.to_parquet(str(folder / "train.parquet"), batch_size=5)
    return folder / "train.parquet"


def img2dataset_shard(path: Path) -> Path:
    """What img2dataset writes with output_format=parquet: null jpg (and an error_message) for failed downloads."""
    ok = [i % 4 != 2 for i in range(N)]
    table = pa.table({
        "key": [f"{i:09d}" for i in range(N)],
        "jpg": pa.array([png(i) if good else None for i, good in enumerate(ok)], pa.binary()),
        "url": [f"https://example.com/{i}.jpg" for i in range(N)],
        "caption": [f"a photo {i}" for i in range(N)],
        "status": ["success" if good else "failed_to_download" for good in ok],
        "error_message": [None if good else "HTTP Error 404: Not Found" for good in ok],
        "width": pa.array([44 if good else None for good in ok], pa.int32()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return path


def image_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N):
        (folder / f"{i:02d}.png").write_bytes(png(i))
    return folder


def path_dataset(parquet: Path, images: Path, extra_paths: tuple[str, ...] = ()) -> Path:
    """What `Dataset.from_dict` with an Image feature cast from file paths writes with to_parquet (datasets 5.2):
    each cell the image's absolute path, bytes null. `extra_paths` are appended as written (hostile cells)."""
    from datasets import ClassLabel, Dataset
    from datasets import Image as ImageFeature

    paths = [str(image_files(images) / f"{i:02d}.png") for i in range(N)] + list(extra_paths)
    data = Dataset.from_dict({"image": paths, "label": [i % 3 for i in range(len(paths))]})
    data = data.cast_column("image", ImageFeature()).cast_column("label", ClassLabel(names=["ant", "bee", "cow"]))
    parquet.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(parquet), batch_size=5)
    return parquet


def class_folders(folder: Path) -> Path:
    """An ImageFolder layout: image i in folder ant, bee or cow (i % 3), named {i:02d}.png."""
    for i in range(N):
        (folder / ["ant", "bee", "cow"][i % 3]).mkdir(parents=True, exist_ok=True)
        (folder / ["ant", "bee", "cow"][i % 3] / f"{i:02d}.png").write_bytes(png(i))
    return folder


def imagefolder_parquet(parquet: Path, folder: Path, cache: Path) -> Path:
    """`load_dataset("imagefolder", data_dir=...)` of `class_folders`, then to_parquet: absolute paths, bytes null,
    labels a ClassLabel named after the folders."""
    from datasets import load_dataset

    data = load_dataset("imagefolder", data_dir=str(class_folders(folder)), split="train", cache_dir=str(cache))
    parquet.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(parquet), batch_size=5)
    return parquet


def nested_image_datasets(folder: Path) -> tuple[Path, Path]:
    """`datasets` parquet files whose images are nested: an Image inside a dict feature, and a List(Image)."""
    from datasets import ClassLabel, Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    label = ClassLabel(names=["ant", "bee", "cow"])
    in_struct = Features({"sample": {"img": ImageFeature(), "caption": Value("string")}, "label": label})
    Dataset.from_dict({"sample": [{"img": {"bytes": png(i), "path": None}, "caption": f"c{i}"} for i in range(N)],
                       "label": [i % 3 for i in range(N)]}, features=in_struct).to_parquet(str(folder / "struct.parquet"))
    in_list = Features({"images": List(ImageFeature()), "label": label})
    Dataset.from_dict({"images": [[{"bytes": png(i), "path": None}] for i in range(N)],
                       "label": [i % 3 for i in range(N)]}, features=in_list).to_parquet(str(folder / "list.parquet"))
    return folder / "struct.parquet", folder / "list.parquet"


def saved_dataset(folder: Path, num_shards: int = 2) -> Path:
    """`Dataset.save_to_disk` of N images (bytes) with a ClassLabel and a caption: `num_shards` Arrow IPC
    streams `data-0000k-of-0000n.arrow`, state.json listing them, dataset_info.json with the features."""
    from datasets import ClassLabel, Dataset
    from datasets import Image as ImageFeature

    cells = [{"bytes": png(i), "path": None} for i in range(N)]
    data = Dataset.from_dict({"image": cells, "label": [i % 3 for i in range(N)],
                              "caption": [f"caption {i}" for i in range(N)]})
    data = data.cast_column("image", ImageFeature()).cast_column("label", ClassLabel(names=["ant", "bee", "cow"]))
    data.save_to_disk(str(folder), num_shards=num_shards)
    return folder
