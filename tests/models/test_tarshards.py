"""Webdataset-style .tar inputs: one shard per tar, samples become rows, unsafe members are reported."""

from __future__ import annotations

import io
import tarfile

import pyarrow.parquet as pq
from PIL import Image
from support import build_tiny_vit

from orchestrator.config import Settings
from orchestrator.inputs.manifest import write_manifests
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.jobs import parse_spec
from workers.context import WorkerContext
from workers.runner import run_shard


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_each_tar_is_one_shard_and_loose_images_are_sharded_as_usual(tmp_path):
    _write_tar(tmp_path / "a.tar", {"x.png": _png(1)})
    _write_tar(tmp_path / "b.tar", {"y.png": _png(2)})
    for i in range(3):
        (tmp_path / f"loose-{i}.png").write_bytes(_png(i))
    job_plan = plan("file://" + str(tmp_path), 2, WorkerContext(Settings()).store)
    shards = list(job_plan.shards())
    assert job_plan.n_shards == len(shards) == 4  # 2 shards of loose images, 1 per tar
    assert [len(items) for _, items in shards] == [2, 1, 1, 1]
    assert [items[0].tar for _, items in shards[2:]] == [True, True]


def test_tar_samples_become_rows_in_member_order_and_bad_samples_become_error_rows(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    _write_tar(images / "shard-000.tar", {
        "0001.png": _png(10), "0002.jpg": b"not a jpeg", "0003.png": _png(200), "meta.json": b"{}",
        "../evil.png": _png(5),
    })
    model = build_tiny_vit(tmp_path / "model")
    # No Redis behind this broker URL: the shard function reports through its callbacks, never to the ledger.
    ctx = WorkerContext(Settings(broker_url="redis://127.0.0.1:1/0"))
    spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / "out"),
                       "model": str(model), "shard_size": 100})
    write_manifests(plan(spec.input, spec.shard_size, ctx.store), spec.output, ctx.store)
    found: list[int] = []
    marker = run_shard(spec, 0, ctx, job_id="job-1", on_found=found.append)
    assert found == [5]  # the tar's samples, which the plan could not count
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == [  # webdataset's sample keys: the name up to its first dot
        "shard-000.tar/0001", "shard-000.tar/0002", "shard-000.tar/0003", "shard-000.tar/meta", "shard-000.tar/../evil"]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[1]["error"] and rows[1]["label"] is None
    assert "sample 'meta' has no image" in rows[3]["error"] and "json" in rows[3]["error"]
    assert "unsafe member name" in rows[4]["error"]
    assert marker.rows == 5 and marker.errors == 3
    assert not (tmp_path / "evil.png").exists()


def test_keep_columns_with_nothing_to_take_them_from_are_refused_at_submit(tmp_path):
    """img2dataset's sidecar parquet (no image column) beside image files: nothing can give `caption`, so
    submit says so; it used to pass the check and then every shard failed on a kept-columns file never written."""
    import pyarrow as pa
    import pytest

    from orchestrator.errors import SpecError
    from orchestrator.inputs.parquetinputs import ParquetColumns

    (tmp_path / "0001.png").write_bytes(_png(1))
    pq.write_table(pa.table({"key": ["0001"], "caption": ["a photo"]}), tmp_path / "00000.parquet")
    store = WorkerContext(Settings()).store
    with pytest.raises(SpecError, match="--keep-columns caption: .*no .tar file and no parquet file with an image"):
        plan("file://" + str(tmp_path), 10, store, ParquetColumns(id="key", keep=("caption",)))
