"""Parquet inputs through the real stack: CLI -> Redis -> a worker process -> moto's S3, read with Range GETs.

A `datasets` parquet (Image + ClassLabel, two cells saved by path) sits next to the same images as
files, so one classify job shows both give the same rows; an img2dataset shard (null `jpg` where the
download failed) is embedded with its own `key` column as row keys and its url and caption kept.
"""

from __future__ import annotations

import pytest
from parquet_datasets import N, hf_dataset, image_files, img2dataset_shard, saved_dataset

from orchestrator.inputs.manifest import Item
from orchestrator.inputs.parquetinputs import ParquetColumns, ReadStats
from orchestrator.inputs.tablefiles import plan_parquet
from orchestrator.published.results import read_embeddings, read_table
from orchestrator.store.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bucket, upload, tiny_model) -> str:
    local = tmp_path_factory.mktemp("parquet-inputs")
    hf_dataset(local / "mixed" / "data", with_bad_rows=True)
    image_files(local / "mixed" / "files")
    img2dataset_shard(local / "laion" / "00000.parquet")
    saved_dataset(local / "saved")
    upload(local, bucket, "parquet-inputs")
    upload(tiny_model, bucket, "models/tiny-vit-parquet")
    return f"s3://{bucket}/parquet-inputs"


@pytest.fixture(scope="module")
def worker(workers):
    workers.start("parquet-w1")
    return workers


def run_job(cli, *args: str) -> None:
    submitted = cli(["submit", *args])
    assert submitted.returncode == 0, submitted.stderr
    waited = cli(["wait", submitted.stdout.strip().splitlines()[-1]])
    assert waited.returncode == 0, waited.stdout + waited.stderr


def test_parquet_rows_classify_like_the_same_images_as_files_over_s3(inputs, worker, cli, client, bucket):
    out = f"s3://{bucket}/out/parquet-classify/"
    run_job(cli, "classify", "--input", f"{inputs}/mixed/", "--output", out, "--model",
            f"s3://{bucket}/models/tiny-vit-parquet/", "--shard-size", "8", "--top-k", "3", "--keep-columns", "caption")
    rows = {r["key"]: r for r in read_table(out, client.store).to_pylist()}
    parquet = {k: r for k, r in rows.items() if k.startswith("data/train.parquet/")}
    assert len(parquet) == N + 4 and len(rows) == len(parquet) + N + 2  # + the files, + the two side images
    for i in range(N):
        mine, theirs = parquet[f"data/train.parquet/{i}"], rows[f"files/{i:02d}.png"]
        assert mine["error"] is None and mine["topk_ids"] == theirs["topk_ids"]
        assert mine["caption"] == f"caption {i}" and theirs["caption"] is None
    assert "outside the job's input" in parquet[f"data/train.parquet/{N + 1}"]["error"]
    assert "does not exist" in parquet[f"data/train.parquet/{N + 2}"]["error"]
    assert "null" in parquet[f"data/train.parquet/{N + 3}"]["error"]


def test_an_img2dataset_shard_embeds_keyed_by_its_key_column(inputs, worker, cli, client, bucket):
    out = f"s3://{bucket}/out/parquet-embed/"
    run_job(cli, "embed", "--input", f"{inputs}/laion/", "--output", out, "--model",
            f"s3://{bucket}/models/tiny-vit-parquet/", "--id-column", "key", "--keep-columns", "url,caption")
    index = {r["key"]: r for r in read_table(out, client.store).to_pylist()}
    assert sorted(index) == [f"{i:09d}" for i in range(N)]
    assert all(index[f"{i:09d}"]["url"] == f"https://example.com/{i}.jpg" for i in range(N))
    failed = {k for k, r in index.items() if r["error"]}
    assert failed == {f"{i:09d}" for i in range(N) if i % 4 == 2}
    keys, vectors = read_embeddings(out, store=client.store)
    assert keys == sorted(set(index) - failed) and vectors.shape[0] == len(keys)


def test_planning_over_s3_makes_one_range_get_per_parquet_file(inputs, settings):
    store, stats = ObjectStore(settings), ReadStats()
    info = store.info(f"{inputs}/laion/00000.parquet")
    groups = plan_parquet([Item("00000.parquet", info.uri, info.size, info.etag)], store, ParquetColumns(), inputs,
                          stats).row_groups
    assert [g.rows for g in groups] == [4, 4, 4] and stats.requests == 1  # the footer's Range GET


def test_a_save_to_disk_folder_classifies_over_s3_with_its_classlabel_kept(inputs, worker, cli, client, bucket):
    out = f"s3://{bucket}/out/saved-classify/"
    run_job(cli, "classify", "--input", f"{inputs}/saved/", "--output", out, "--model",
            f"s3://{bucket}/models/tiny-vit-parquet/", "--shard-size", "5", "--keep-columns", "label,caption")
    rows = {r["key"]: r for r in read_table(out, client.store).to_pylist()}
    keys = {f"data-{i // (N // 2):05d}-of-00002.arrow/{i % (N // 2)}": i for i in range(N)}
    assert sorted(rows) == sorted(keys)
    assert all(rows[k]["error"] is None and (rows[k]["input_label"], rows[k]["caption"]) == (i % 3, f"caption {i}")
               for k, i in keys.items())
