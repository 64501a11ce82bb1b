"""Parquet inputs over the in-process shard path, with files written by the libraries users write them with:
`datasets` (`Dataset.to_parquet`, Image + ClassLabel features, cells saved by path) and pyarrow for an
img2dataset-shaped shard (`key`, `jpg` null where the download failed, `url`, `caption`, `status`,
`error_message`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_datasets import N, hf_dataset, image_files, img2dataset_shard, png

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.parquetinputs import ParquetColumns, ReadStats
from orchestrator.inputs.planner import plan
from orchestrator.inputs.tablefiles import plan_parquet
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_embeddings, read_table
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.decode.parquetshards import expand_row_groups
from workers.inprocess import run_local


def planned_row_groups(path: Path) -> list[Item]:
    item = Item(path.name, normalize_uri(str(path)), path.stat().st_size)
    return plan_parquet([item], ObjectStore(Settings()), ParquetColumns(), normalize_uri(str(path.parent))).row_groups


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def run(kind: str, source: Path, out: Path, model: Path, ctx: WorkerContext, **options) -> str:
    spec = parse_spec({"kind": kind, "input": str(source), "output": str(out), "model": str(model),
                       "device": "cpu", "shard_size": 5, **options})
    run_local(spec, ctx)
    return spec.output


def by_key(table: pa.Table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


def test_a_datasets_parquet_classifies_as_the_same_images_as_files(tmp_path, hf_model_dir, ctx):
    dataset = hf_dataset(tmp_path / "ds")  # the one object as the input: its side/ images are not inputs
    files = image_files(tmp_path / "files")
    rows = by_key(read_table(run("classify", dataset, tmp_path / "o1", hf_model_dir, ctx)))
    as_files = by_key(read_table(run("classify", files, tmp_path / "o2", hf_model_dir, ctx)))
    assert sorted(rows) == sorted(f"train.parquet/{i}" for i in range(N))
    for i in range(N):
        mine, theirs = rows[f"train.parquet/{i}"], as_files[f"{i:02d}.png"]
        assert mine["error"] is None and mine["topk_ids"] == theirs["topk_ids"]
        assert mine["topk_scores"] == pytest.approx(theirs["topk_scores"], abs=1e-6)


def test_row_keys_are_stable_across_runs_and_every_bad_cell_is_an_error_row(tmp_path, hf_model_dir, ctx):
    dataset = hf_dataset(tmp_path / "ds", with_bad_rows=True)
    first = read_table(run("classify", dataset, tmp_path / "o1", hf_model_dir, ctx)).to_pylist()
    second = read_table(run("classify", dataset, tmp_path / "o2", hf_model_dir, ctx)).to_pylist()
    assert [(r["key"], r["etag"]) for r in first] == [(r["key"], r["etag"]) for r in second]
    errors = {r["key"]: r["error"] for r in first if r["error"]}
    assert set(errors) == {f"train.parquet/{i}" for i in range(N, N + 4)}
    assert "cannot identify" in errors[f"train.parquet/{N}"] or "not an image" in errors[f"train.parquet/{N}"]
    assert "outside the job's input" in errors[f"train.parquet/{N + 1}"]
    assert "does not exist" in errors[f"train.parquet/{N + 2}"]
    assert "null" in errors[f"train.parquet/{N + 3}"]


def test_an_img2dataset_shard_keys_rows_by_its_key_column_and_keeps_columns(tmp_path, hf_model_dir, ctx):
    img2dataset_shard(tmp_path / "laion" / "00000.parquet")
    out = run("classify", tmp_path / "laion", tmp_path / "o", hf_model_dir, ctx, id_column="key",
              keep_columns="url,caption,status,width,key")
    table = read_table(out)
    rows = by_key(table)
    assert sorted(rows) == [f"{i:09d}" for i in range(N)]
    assert table.schema.field("width").type == pa.int32()
    assert table.column("input_key").to_pylist() == table.column("key").to_pylist()  # `key` is the output's
    for i in range(N):
        row = rows[f"{i:09d}"]
        assert (row["url"], row["caption"]) == (f"https://example.com/{i}.jpg", f"a photo {i}")
        if i % 4 == 2:
            assert row["error"] == "image cell is null (no bytes, no path): HTTP Error 404: Not Found"
            assert row["status"] == "failed_to_download"
        else:
            assert row["error"] is None and row["label"] is not None


def test_kept_columns_named_like_output_columns_are_prefixed_and_embed_keeps_them_too(tmp_path, hf_model_dir, ctx):
    out = run("embed", hf_dataset(tmp_path / "ds"), tmp_path / "o", hf_model_dir, ctx, keep_columns="label,caption")
    index = read_table(out)  # an embed index has no label column: the dataset's keeps its name
    assert index.column("label").to_pylist() == [i % 3 for i in range(N)]
    assert index.column("caption").to_pylist() == [f"caption {i}" for i in range(N)]
    keys, vectors = read_embeddings(out)
    files_out = run("embed", image_files(tmp_path / "files"), tmp_path / "o2", hf_model_dir, ctx)
    file_keys, file_vectors = read_embeddings(files_out)
    assert (keys, file_keys) == ([f"train.parquet/{i}" for i in range(N)], [f"{i:02d}.png" for i in range(N)])
    np.testing.assert_allclose(vectors.astype(np.float32), file_vectors.astype(np.float32), atol=1e-3)


def test_planning_reads_only_footers(tmp_path):
    """4 MB of cells in 20 row groups: planning makes one ranged read of the file's last 64 KiB (pyarrow's
    footer read), whatever the file's size."""
    path = tmp_path / "big" / "00000.parquet"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"jpg": [rng.bytes(20_000) for _ in range(200)], "key": [str(i) for i in range(200)]}),
                   path, row_group_size=10, compression="none")
    store, stats = ObjectStore(Settings()), ReadStats()
    groups = plan_parquet([Item("00000.parquet", normalize_uri(str(path)), path.stat().st_size)], store,
                          ParquetColumns(), normalize_uri(str(path.parent)), stats).row_groups
    assert [g.rows for g in groups] == [10] * 20 and groups[-1].first_row == 190
    assert stats.requests == 1 and stats.bytes <= 64 * 1024 < path.stat().st_size / 50


def test_a_worker_holds_one_row_group_of_images_at_a_time(tmp_path, hf_model_dir, ctx):
    path = img2dataset_shard(tmp_path / "laion" / "00000.parquet")
    root = normalize_uri(str(path.parent))
    groups = planned_row_groups(path)
    expanded = expand_row_groups(groups, ObjectStore(Settings()), ParquetColumns(), max_bytes=1 << 20,
                                 max_group_bytes=1 << 30, scope=root)
    cells = [expanded.cells.pop(item.uri) for item in expanded.items]
    assert [isinstance(c, bytes) for c in cells] == [i % 4 != 2 for i in range(N)]
    assert expanded.cells.peak_groups == 1


def test_a_cell_over_the_byte_cap_is_refused_per_row(tmp_path):
    path = img2dataset_shard(tmp_path / "laion" / "00000.parquet")
    root = normalize_uri(str(path.parent))
    groups = planned_row_groups(path)
    cap = len(png(5)) - 1  # images 0..4 are smaller (they grow with the seed)
    expanded = expand_row_groups(groups, ObjectStore(Settings()), ParquetColumns(), max_bytes=cap, max_group_bytes=1 << 30,
                                 scope=root)
    cells = {item.key: expanded.cells.pop(item.uri) for item in expanded.items}
    assert isinstance(cells["00000.parquet/4"], bytes)
    assert "over the cap" in cells["00000.parquet/5"]


def test_a_malformed_parquet_file_is_a_clear_submit_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(SpecError, match="broken.parquet.*not a readable parquet file"):
        plan(normalize_uri(str(tmp_path / "in")), 100, ObjectStore(Settings()))


def test_column_options_are_checked_at_submit(tmp_path):
    img2dataset_shard(tmp_path / "in" / "00000.parquet")
    root = normalize_uri(str(tmp_path / "in"))
    with pytest.raises(SpecError, match="--keep-columns nope: not a column"):
        plan(root, 100, ObjectStore(Settings()), ParquetColumns(keep=("nope",)))
    with pytest.raises(SpecError, match="--image-column 'url'.*expected binary"):
        plan(root, 100, ObjectStore(Settings()), ParquetColumns(image="url"))
    image_files(tmp_path / "files")
    with pytest.raises(SpecError, match="--id-column apply to parquet inputs"):
        plan(normalize_uri(str(tmp_path / "files")), 100, ObjectStore(Settings()), ParquetColumns(id="key"))
    summary = plan(root, 5, ObjectStore(Settings())).summary()
    assert (summary["items"], summary["shards"], summary["parquet_row_groups"]) == (N, 3, 3)
    assert json.loads(json.dumps(summary))["parquet_rows"] == N


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embed_writes_parquet_vectors_that_read_back_like_the_npy_arrays(dtype, tmp_path, hf_model_dir, ctx):
    dataset = hf_dataset(tmp_path / "ds", with_bad_rows=True)
    out = run("embed", dataset, tmp_path / "o", hf_model_dir, ctx, pooling="cls,patches", parquet_vectors=dtype)
    keys, npy = read_embeddings(out, "cls")
    parquet_keys, vectors = read_embeddings(out, "cls", source="parquet")
    assert parquet_keys == keys == [f"train.parquet/{i}" for i in range(N)]  # error rows have no vector
    assert vectors.dtype == np.dtype(dtype) and vectors.shape == npy.shape
    np.testing.assert_array_equal(vectors.astype(np.float16), npy)
    _, patches = read_embeddings(out, "patches", source="parquet")
    assert patches.shape == read_embeddings(out, "patches")[1].shape
    part = next((Path(out[len("file://"):]) / "_jobs").glob("*/vectors/part-00000.parquet"))
    column = pq.read_schema(part).field("cls").type
    assert pa.types.is_fixed_size_list(column) and column.value_type == getattr(pa, dtype)()
    from datasets import Dataset

    rows = Dataset.from_parquet(str(part))
    assert rows[0]["key"] == "train.parquet/0" and len(rows[0]["cls"]) == npy.shape[1]


def test_a_parquet_file_without_an_image_column_is_ignored_like_a_sidecar(tmp_path):
    img2dataset_shard(tmp_path / "in" / "00000.parquet")
    pq.write_table(pa.table({"key": ["a"], "url": ["https://example.com/a.jpg"]}), tmp_path / "in" / "00001.parquet")
    job_plan = plan(normalize_uri(str(tmp_path / "in")), 100, ObjectStore(Settings()))
    assert job_plan.ignored == ["00001.parquet"] and job_plan.summary()["items"] == N
