"""`datasets` files as users have them, over the in-process shard path: to_parquet of an Image cast from file
paths and of load_dataset("imagefolder") (each cell an absolute path, bytes null), read inside the input or an
--image-root and nowhere else; save_to_disk folders (Arrow IPC streams); images nested in a struct or a list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from parquet_datasets import (
    N,
    class_folders,
    image_files,
    imagefolder_parquet,
    nested_image_datasets,
    path_dataset,
    png,
    saved_dataset,
)

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.labels import load_labeled
from orchestrator.inputs.parquetinputs import ParquetColumns, columns_of
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.published.results import prefix_holder, read_embeddings, read_table
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.decode.labeledcells import ContainerReader
from workers.inprocess import run_local
from workers.training.evaluation import evaluate
from workers.training.finetune import finetune

NAMES = ["ant", "bee", "cow"]
TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def run(kind: str, source: Path, out: Path, model: Path, ctx: WorkerContext, **options) -> dict[str, dict]:
    spec = parse_spec({"kind": kind, "input": str(source), "output": str(out), "model": str(model),
                       "device": "cpu", "shard_size": 5, **options})
    run_local(spec, ctx)
    return {row["key"]: row for row in read_table(spec.output).to_pylist()}


def assert_same_predictions(rows: dict[str, dict], files: dict[str, dict], pairs: dict[str, str]) -> None:
    for key, file_key in pairs.items():
        assert rows[key]["error"] is None, rows[key]["error"]
        assert rows[key]["topk_ids"] == files[file_key]["topk_ids"]
        assert rows[key]["topk_scores"] == pytest.approx(files[file_key]["topk_scores"], abs=1e-6)


def test_absolute_path_cells_inside_the_input_classify_as_their_files(tmp_path, hf_model_dir, ctx):
    dataset = path_dataset(tmp_path / "ds" / "train.parquet", tmp_path / "ds" / "images")
    cells = pq.read_table(dataset).column("image").to_pylist()  # what datasets 5.2 writes: absolute, no bytes
    assert cells[0] == {"bytes": None, "path": str(tmp_path / "ds" / "images" / "00.png")}
    rows = run("classify", dataset, tmp_path / "o1", hf_model_dir, ctx)
    files = run("classify", tmp_path / "ds" / "images", tmp_path / "o2", hf_model_dir, ctx)
    assert sorted(rows) == sorted(f"train.parquet/{i}" for i in range(N))
    assert_same_predictions(rows, files, {f"train.parquet/{i}": f"{i:02d}.png" for i in range(N)})


def test_absolute_paths_outside_the_input_are_error_rows_until_image_root_names_their_folder(
        tmp_path, hf_model_dir, ctx):
    hostile = ("/etc/passwd", str(tmp_path / "images" / ".." / ".." / "x.png"), "../../etc/passwd",
               f"file://{tmp_path / 'elsewhere.png'}")
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    dataset = path_dataset(tmp_path / "ds" / "train.parquet", tmp_path / "images", hostile)
    refused = run("classify", dataset, tmp_path / "o1", hf_model_dir, ctx)
    assert len(refused) == N + len(hostile)
    assert all("outside the job's input" in row["error"] for row in refused.values())
    assert "--image-root" in refused["train.parquet/0"]["error"]
    rows = run("classify", dataset, tmp_path / "o2", hf_model_dir, ctx, image_root=str(tmp_path / "images"))
    recorded = prefix_holder(normalize_uri(str(tmp_path / "o2")), ObjectStore(Settings()))
    assert recorded is not None and recorded.spec["image_root"] == normalize_uri(str(tmp_path / "images"))
    files = run("classify", tmp_path / "images", tmp_path / "o3", hf_model_dir, ctx)
    assert_same_predictions(rows, files, {f"train.parquet/{i}": f"{i:02d}.png" for i in range(N)})
    for offset in range(len(hostile)):  # the root lets in its own folder, nothing above or beside it
        assert "outside the job's input" in rows[f"train.parquet/{N + offset}"]["error"]


def test_image_root_is_checked_at_submit_and_recorded_with_the_spec(tmp_path):
    dataset = path_dataset(tmp_path / "ds" / "train.parquet", tmp_path / "images")
    store = ObjectStore(Settings())
    for root, words in ((tmp_path / "missing", "cannot be listed"), ("/", "any file")):
        spec = parse_spec({"kind": "classify", "input": str(dataset), "output": str(tmp_path / "o"),
                           "model": "hf:x", "image_root": str(root)})
        with pytest.raises(SpecError, match=words):
            plan(spec.input, 5, store, columns_of(spec))
    with pytest.raises(SpecError, match="--image-root apply to parquet inputs"):
        plan(normalize_uri(str(tmp_path / "images")), 5, store, columns_of(parse_spec(
            {"kind": "embed", "input": str(tmp_path / "images"), "output": str(tmp_path / "o"), "model": "hf:x",
             "image_root": str(tmp_path / "images")})))
    spec = parse_spec({"kind": "embed", "input": str(dataset), "output": str(tmp_path / "o"), "model": "hf:x",
                       "image_root": str(tmp_path / "images")})
    assert spec.image_root == normalize_uri(str(tmp_path / "images"))
    assert plan(spec.input, 5, store, columns_of(spec)).summary()["items"] == N


def test_an_imagefolder_dataset_to_parquet_reads_its_files_through_image_root(tmp_path, hf_model_dir, ctx):
    dataset = imagefolder_parquet(tmp_path / "ds" / "train.parquet", tmp_path / "photos", tmp_path / "cache")
    column = pq.read_table(dataset).column("image").to_pylist()
    assert all(cell["bytes"] is None and cell["path"].startswith("/") for cell in column)  # what datasets writes
    rows = run("classify", dataset, tmp_path / "o1", hf_model_dir, ctx, image_root=str(tmp_path / "photos"),
               keep_columns="label")
    files = run("classify", class_folders(tmp_path / "photos"), tmp_path / "o2", hf_model_dir, ctx)
    by_path = {cell["path"]: f"train.parquet/{row}" for row, cell in enumerate(column)}
    pairs = {key: path.split("/photos/", 1)[1] for path, key in by_path.items()}
    assert len(rows) == N and len(pairs) == N
    assert_same_predictions(rows, files, pairs)
    assert {NAMES[rows[key]["input_label"]] for key in rows} == set(NAMES)
    assert all(NAMES[rows[key]["input_label"]] == pairs[key].split("/")[0] for key in rows)



def test_images_nested_in_a_struct_or_a_list_are_refused_at_submit_naming_the_column(tmp_path):
    store = ObjectStore(Settings())
    for path, column in zip(nested_image_datasets(tmp_path / "nested"), ("sample", "images"), strict=True):
        uri = normalize_uri(str(path))
        for columns in (ParquetColumns(), ParquetColumns(image=column)):
            with pytest.raises(SpecError, match=f"column '{column}' holds its images nested.*--image-column"):
                plan(uri, 5, store, columns)
        with pytest.raises(SpecError, match=f"column '{column}' holds its images nested.*--image-column"):
            load_labeled(uri, store)


def test_a_save_to_disk_folder_classifies_and_embeds_its_rows_as_the_same_images_as_files(tmp_path, hf_model_dir, ctx):
    saved = saved_dataset(tmp_path / "saved")
    job_plan = plan(normalize_uri(str(saved)), 5, ObjectStore(Settings()))
    summary = job_plan.summary()
    assert (summary["items"], summary["parquet_files"], summary["parquet_row_groups"]) == (N, 2, 2)
    rows = run("classify", saved, tmp_path / "o1", hf_model_dir, ctx, keep_columns="label,caption")
    files = run("classify", image_files(tmp_path / "files"), tmp_path / "o2", hf_model_dir, ctx)
    half = N // 2
    keys = {f"data-{i // half:05d}-of-00002.arrow/{i % half}": i for i in range(N)}
    assert sorted(rows) == sorted(keys)
    assert_same_predictions(rows, files, {key: f"{i:02d}.png" for key, i in keys.items()})
    assert all((rows[key]["input_label"], rows[key]["caption"]) == (i % 3, f"caption {i}") for key, i in keys.items())
    embedded = []
    for source, out in ((saved, tmp_path / "e1"), (tmp_path / "files", tmp_path / "e2")):
        spec = parse_spec({"kind": "embed", "input": str(source), "output": str(out), "model": str(hf_model_dir),
                           "device": "cpu"})
        run_local(spec, ctx)
        embedded.append(read_embeddings(spec.output))
    (saved_keys, vectors), (_, file_vectors) = embedded
    assert saved_keys == sorted(keys, key=keys.__getitem__)
    np.testing.assert_allclose(vectors.astype(np.float32), file_vectors.astype(np.float32), atol=1e-3)


def test_a_save_to_disk_folder_gives_finetune_and_evaluate_its_classlabel_names(tmp_path, ctx):
    saved = saved_dataset(tmp_path / "saved")
    store = ObjectStore(Settings())
    items = load_labeled(normalize_uri(str(saved)), store)
    assert [item.label for item in items] == [NAMES[i % 3] for i in range(N)]
    assert items[7].key == "data-00001-of-00002.arrow/1"
    assert ContainerReader(store, Settings()).read(items[7].uri) == png(7)
    torch.set_num_threads(1)
    spec = FinetuneSpec(train=str(saved), output=str(tmp_path / "model"), config=TINY_VIT, epochs=1, lr=1e-3,
                        batch_size=4, augment="none", val_split=0.25, device="cpu", precision="fp32")
    assert finetune(spec, "job-saved", ctx, lambda _: None).errors == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == NAMES
    evaluate(EvaluateSpec(input=str(saved), model=str(tmp_path / "model"), output=str(tmp_path / "e"), device="cpu",
                          precision="fp32"), "job-eval", ctx, lambda _: None)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (metrics["n_images"], metrics["n_errors"]) == (N, 0)
    assert sum(v["support"] for v in metrics["per_class"].values()) == N


def test_state_json_decides_which_streams_are_read(tmp_path):
    saved = saved_dataset(tmp_path / "saved")
    store = ObjectStore(Settings())
    shutil.copy(saved / "data-00000-of-00002.arrow", saved / "stale.arrow")
    job_plan = plan(normalize_uri(str(saved)), 5, store)
    assert "stale.arrow" in job_plan.ignored and job_plan.summary()["items"] == N
    (saved / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(SpecError, match="state.json lists .*data-00001-of-00002.arrow, which is not there"):
        plan(normalize_uri(str(saved)), 5, store)
