"""Every published job is also a Delta Lake table at its output prefix: the real readers
(deltalake, polars, DuckDB, pandas through deltalake) see exactly `read_table`'s rows, an
--overwrite rerun is one commit that replaces the rows, and the version before it still reads
the previous run. The same on S3 (moto)."""

from __future__ import annotations

import json
import logging

import duckdb
import numpy as np
import polars as pl
import pytest
from deltalake import DeltaTable
from PIL import Image

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.commits import JobRecord
from orchestrator.published.delta import commit_job, job_versions, storage_options, table_uri
from orchestrator.published.results import read_table, success_record
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.inprocess import run_local

N_IMAGES = 6


def write_images(folder, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img-{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # an error row: in the table too


def rows_by_key(records: list[dict]) -> dict[str, dict]:
    return {row["key"]: row for row in records}


def run(kind: str, input_dir, output: str, model_dir, **options) -> str:
    spec = parse_spec({"kind": kind, "input": str(input_dir), "output": output, "model": str(model_dir),
                       "device": "cpu", **options})
    job_id, _ = run_local(spec, WorkerContext(Settings()))
    return job_id


def delta_readers(output: str) -> dict[str, list[dict]]:
    """The same table through each reader the README names, as row dicts."""
    uri, options = table_uri(normalize_uri(output)), storage_options(Settings(), normalize_uri(output))
    table = DeltaTable(uri, storage_options=options)
    con = duckdb.connect()
    con.register("results", table.to_pyarrow_dataset())
    return {
        "deltalake": table.to_pyarrow_table().to_pylist(),
        "pandas": table.to_pandas().to_dict("records"),
        "polars": pl.read_delta(uri, storage_options=options).to_dicts(),
        "duckdb": con.sql("SELECT * FROM results").arrow().read_all().to_pylist(),
    }


def same_rows(expected: list[dict], got: list[dict]) -> bool:
    def plain(row: dict) -> dict:
        return {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else v)
                for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}

    return {k: plain(r) for k, r in rows_by_key(expected).items()} == {k: plain(r) for k, r in rows_by_key(got).items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta-images")
    write_images(root / "a", 1)
    write_images(root / "b", 2)
    return root


def test_every_reader_reads_a_classify_output_as_read_table_does(images, tmp_path, hf_model_dir):
    output = str(tmp_path / "classify")
    run("classify", images / "a", output, hf_model_dir, top_k=2)
    expected = read_table(output).to_pylist()
    assert len(expected) == N_IMAGES + 1
    for reader, got in delta_readers(output).items():
        assert len(got) == len(expected), reader
        assert same_rows(expected, got), reader
    broken = rows_by_key(delta_readers(output)["polars"])["broken.png"]
    assert broken["error"] and broken["label"] is None


def test_the_readme_glob_reads_the_rows_and_the_prefix_itself_is_no_parquet_dataset(images, tmp_path, hf_model_dir):
    import pandas as pd

    output = str(tmp_path / "globs")
    run("embed", images / "a", output, hf_model_dir, pooling=["cls"], parquet_vectors="float32")
    job_dir = json.loads((tmp_path / "globs" / "_SUCCESS.json").read_text())["job_dir"]
    exact = duckdb.sql(f"SELECT key FROM read_parquet('{output}/{job_dir}/*.parquet')").fetchall()
    assert sorted(k for (k,) in exact) == sorted(read_table(output).column("key").to_pylist())
    assert len(pd.read_parquet(output)) == 0, "pyarrow skips the _-prefixed folders: the prefix reads no rows"
    [mixed] = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/**/*.parquet', union_by_name=true)").fetchall()
    assert mixed[0] > N_IMAGES + 1, "a recursive glob mixes the index with the vectors"


def test_an_embed_output_is_its_index_table_and_keys_join_to_the_vectors(images, tmp_path, hf_model_dir):
    from orchestrator.published.results import read_embeddings

    output = str(tmp_path / "embed")
    run("embed", images / "a", output, hf_model_dir, pooling=["cls"])
    expected = read_table(output).to_pylist()
    for reader, got in delta_readers(output).items():
        assert len(got) == len(expected) == N_IMAGES + 1, reader
        assert same_rows(expected, got), reader
    keys, vectors = read_embeddings(output, "cls")
    good = {r["key"] for r in delta_readers(output)["deltalake"] if r["error"] is None}
    assert set(keys) == good and len(vectors) == N_IMAGES


def test_an_overwrite_is_one_commit_and_the_previous_version_still_reads(images, tmp_path, hf_model_dir):
    output = str(tmp_path / "rerun")
    first = run("classify", images / "a", output, hf_model_dir, top_k=1)
    first_rows = read_table(output).to_pylist()
    second = run("classify", images / "b", output, hf_model_dir, top_k=1)
    uri = table_uri(normalize_uri(output))
    table = DeltaTable(uri)
    assert table.version() == 1 and [job for _, job in job_versions(normalize_uri(output), ObjectStore(Settings()))] == [second, first]
    now = rows_by_key(table.to_pyarrow_table().to_pylist())
    assert set(now) == {r["key"] for r in read_table(output).to_pylist()}
    assert all(json.dumps(row["key"]) for row in now.values())
    assert not {p for p in table.file_uris() if first in p}, "the overwritten run's files left the table"
    previous = DeltaTable(uri, version=0).to_pyarrow_table().to_pylist()
    assert same_rows(first_rows, previous)


def test_a_second_commit_of_the_same_job_is_not_made(images, tmp_path, hf_model_dir):
    output = str(tmp_path / "twice")
    job_id = run("classify", images / "a", output, hf_model_dir, top_k=1)
    store = ObjectStore(Settings())
    record = success_record(output, store)
    again = commit_job(normalize_uri(output), record, store)  # a redelivered finalize publishing again
    assert again is not None and not again.committed and again.version == 0
    assert DeltaTable(table_uri(normalize_uri(output))).version() == 0
    assert DeltaTable(table_uri(normalize_uri(output))).transaction_version(f"vitbatch:{job_id}") == 1


def test_on_s3_the_readers_see_the_rows_and_an_overwrite_replaces_them(images, hf_model_dir, s3, bucket,
                                                                         s3_endpoint, monkeypatch):
    monkeypatch.setenv("VITBATCH_S3_ENDPOINT_URL", s3_endpoint)
    output = f"s3://{bucket}/delta/classify/"
    first = run("classify", images / "a", output, hf_model_dir, top_k=1)
    first_rows = read_table(output).to_pylist()
    for reader, got in delta_readers(output).items():
        assert same_rows(first_rows, got), reader
    second = run("classify", images / "b", output, hf_model_dir, top_k=1)
    assert first != second
    options = storage_options(Settings(), output)
    table = DeltaTable(table_uri(output), storage_options=options)
    assert table.version() == 1 and [job for _, job in job_versions(output, ObjectStore(Settings()))] == [second, first]
    assert {r["key"] for r in table.to_pyarrow_table().to_pylist()} == {r["key"] for r in read_table(output).to_pylist()}
    previous = DeltaTable(table_uri(output), version=0, storage_options=options).to_pyarrow_table().to_pylist()
    assert same_rows(first_rows, previous)
    log = s3.list_objects_v2(Bucket=bucket, Prefix="delta/classify/_delta_log/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in log if o["Key"].endswith(".json")) == [
        "00000000000000000000.json", "00000000000000000001.json"]


def test_embed_vectors_load_into_lancedb_and_faiss_in_one_step_and_join_back_by_key(images, tmp_path,
                                                                                    hf_model_dir):
    import faiss
    import lancedb

    from orchestrator.published.results import vector_table

    output = str(tmp_path / "vectors")
    run("embed", images / "a", output, hf_model_dir, pooling=["cls"])
    vectors = vector_table(output, "cls")
    db = lancedb.connect(str(tmp_path / "lancedb"))
    images_table = db.create_table("images", vectors)  # the README's one step
    query = vectors.column("vector")[2].values.to_numpy()
    hits = images_table.search(query).limit(3).to_list()
    assert hits[0]["key"] == vectors.column("key")[2].as_py() and len(hits) == 3

    matrix = np.stack(vectors.column("vector").to_numpy(zero_copy_only=False))
    index = faiss.IndexFlatL2(matrix.shape[1])
    index.add(matrix)
    _, found = index.search(matrix[:1], 1)
    assert vectors.column("key")[int(found[0][0])].as_py() == vectors.column("key")[0].as_py()

    index_rows = rows_by_key(DeltaTable(table_uri(normalize_uri(output))).to_pyarrow_table().to_pylist())
    joined = [index_rows[hit["key"]] for hit in hits]  # every match is a row of the job's index table
    assert all(row["error"] is None for row in joined)


class Said(logging.Handler):
    """The messages a logger said (no reliance on pytest's logging plugin)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rows_of_a_type_delta_cannot_hold_publish_without_a_commit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.lifecycle.commits import PartEntry

    folder = tmp_path / "out" / "_jobs" / "job-1"
    folder.mkdir(parents=True)
    table = pa.table({"key": ["a"], "error": pa.array([None], pa.string()),
                      "input_half": pa.array(np.array([1.5], dtype=np.float16))})  # a float16 kept column
    pq.write_table(table, folder / "part-00000.parquet")
    entry = PartEntry.of((folder / "part-00000.parquet").read_bytes())
    record = JobRecord.from_json({
        "job_id": "job-1", "kind": "classify", "job_dir": "_jobs/job-1", "finished_at": 1.0,
        "parts": [{"name": "_jobs/job-1/part-00000.parquet", "sha256": entry.sha256, "bytes": entry.bytes, "rows": 1}]})
    said = Said()
    logging.getLogger("orchestrator.published.delta").addHandler(said)
    try:
        assert commit_job(normalize_uri(str(tmp_path / "out")), record, ObjectStore(Settings())) is None
    finally:
        logging.getLogger("orchestrator.published.delta").removeHandler(said)
    assert not (tmp_path / "out" / "_delta_log").exists()
    assert any("Delta cannot hold" in message for message in said.messages), said.messages


def test_an_s3_prefix_with_url_characters_gets_its_table_in_place(images, hf_model_dir, s3, bucket, s3_endpoint,
                                                                   monkeypatch):
    monkeypatch.setenv("VITBATCH_S3_ENDPOINT_URL", s3_endpoint)
    output = f"s3://{bucket}/delta/odd#x?y=1 sp/"  # deltalake parses a URL: the key's #, ? and space stay in it
    run("classify", images / "a", output, hf_model_dir, top_k=1)
    log = s3.list_objects_v2(Bucket=bucket, Prefix="delta/odd#x?y=1 sp/_delta_log/")["Contents"]
    assert [o["Key"].rsplit("/", 1)[1] for o in log] == ["00000000000000000000.json"]
    table = DeltaTable(table_uri(output), storage_options=storage_options(Settings(), output))
    assert same_rows(read_table(output).to_pylist(), table.to_pyarrow_table().to_pylist())


def test_a_local_prefix_with_a_percent_publishes_without_a_table(images, tmp_path, hf_model_dir):
    output = tmp_path / "100%41"  # deltalake would decode it to 100A and commit beside the output
    run("classify", images / "a", str(output), hf_model_dir, top_k=1)
    assert len(read_table(str(output)).to_pylist()) == N_IMAGES + 1
    assert not (output / "_delta_log").exists() and not (tmp_path / "100A").exists()
