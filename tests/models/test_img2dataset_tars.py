"""img2dataset's own output, downloaded from a web server on 127.0.0.1 (python's http.server in a thread:
generated images, some URLs missing, some files not images), read by vitbatch with the options its README
gives: webdataset tars keyed by --id-column key with --keep-columns caption (from the samples' own members;
the .parquet file img2dataset writes beside each tar is ignored), and its parquet output the same way."""

from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_datasets import png
from PIL import Image

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from workers.context import WorkerContext
from workers.inprocess import run_local

N_URLS = 12  # URLs 1, 5, 9 are missing (404); 0 and 6 are files that are not images


def site(folder: Path) -> list[str]:
    """The files the server serves: names of the URL list, in order."""
    folder.mkdir()
    names = []
    for i in range(N_URLS):
        name = f"{i}.jpg"
        if i % 4 == 1:
            names.append(f"missing-{i}.jpg")
            continue
        if i % 6 == 0:
            (folder / name).write_bytes(b"<html>not an image</html>")
        else:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(png(i))).save(buffer, "JPEG")
            (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """img2dataset's output of one URL list in a format (caption and an extra column kept), downloaded once
    per format and module from a server that lives as long as the module."""
    from img2dataset import download

    root = tmp_path_factory.mktemp("img2dataset")
    names = site(root / "www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pq.write_table(pa.table({"url": [f"{base}/{name}" for name in names],
                             "caption": [f"caption {i}" for i in range(N_URLS)],
                             "source": [f"row-{i}" for i in range(N_URLS)]}), root / "urls.parquet")

    @functools.cache
    def output(output_format: str) -> Path:
        download(url_list=str(root / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                 save_additional_columns=["source"], output_folder=str(root / output_format),
                 output_format=output_format, processes_count=1, thread_count=4, distributor="multiprocessing",
                 number_sample_per_shard=5, image_size=32, resize_mode="no", enable_wandb=False, timeout=5, retries=0)
        return root / output_format

    yield output
    server.shutdown()


def successes(folder: Path) -> dict[str, dict]:
    """img2dataset's own record of what it downloaded: the rows of its .parquet files whose status is success."""
    rows = pq.read_table(sorted(folder.glob("*.parquet"))).to_pylist()
    return {row["key"]: row for row in rows if row["status"] == "success"}


def classify(source: Path, out: Path, model: Path) -> list[dict]:
    spec = parse_spec({"kind": "classify", "input": str(source), "output": str(out), "model": str(model),
                       "device": "cpu", "id_column": "key", "keep_columns": "caption,source"})
    run_local(spec, WorkerContext(Settings()))
    return read_table(spec.output).to_pylist()


def test_img2dataset_webdataset_output_classifies_keyed_by_its_key_with_its_captions(downloads, tmp_path, hf_model_dir):
    folder = downloads("webdataset")
    expected = successes(folder)
    assert len(expected) == N_URLS - 3 - 2 and sorted(folder.glob("*.tar"))  # 3 missing, 2 not images
    rows = classify(folder, tmp_path / "o", hf_model_dir)
    assert sorted(r["key"] for r in rows) == sorted(expected)  # a row per success, no failure, no sidecar row
    for row in rows:
        assert row["error"] is None and row["label"] is not None
        assert (row["caption"], row["source"]) == (expected[row["key"]]["caption"], expected[row["key"]]["source"])


def test_img2dataset_parquet_output_gives_the_same_rows(downloads, tmp_path, hf_model_dir):
    tars = {r["key"]: r for r in classify(downloads("webdataset"), tmp_path / "o1", hf_model_dir)}
    rows = classify(downloads("parquet"), tmp_path / "o2", hf_model_dir)
    good = {r["key"]: r for r in rows if r["error"] is None}
    assert sorted(good) == sorted(successes(downloads("parquet"))) == sorted(tars)
    assert all("null" in r["error"] for r in rows if r["key"] not in good)  # failed downloads: null cells
    for key, row in good.items():
        assert (row["caption"], row["topk_ids"]) == (tars[key]["caption"], tars[key]["topk_ids"])
