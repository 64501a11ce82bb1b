"""img2dataset's webdataset shard sets named by a brace range: planned without listing, run in order."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobs import parse_spec
from orchestrator.planner import plan
from orchestrator.results import read_table
from orchestrator.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.inprocess import run_local


def write_tar(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
            info = tarfile.TarInfo(f"{seed:05d}{i:04d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))


def test_a_brace_range_plans_one_tar_shard_per_number_without_listing(tmp_path, hf_model_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in (0, 1, 3):  # 00002.tar is missing: an error row, not a failed job
        write_tar(shards / f"{number:05d}.tar", 3, number)
    (shards / "00099.tar").write_bytes(b"outside the range: never read")
    uri = normalize_uri(str(shards)) + "/{00000..00003}.tar"
    job_plan = plan(uri, 1000, ObjectStore(Settings()))
    assert [t.key for t in job_plan.tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]

    spec = parse_spec({"kind": "classify", "input": uri, "output": str(tmp_path / "out"), "model": str(hf_model_dir),
                       "device": "cpu", "top_k": 1})
    run_local(spec, WorkerContext(Settings()))
    rows = read_table(spec.output).to_pylist()
    good = [r["key"] for r in rows if r["error"] is None]
    assert len(good) == 9 and all(key.split("/")[0] in ("00000.tar", "00001.tar", "00003.tar") for key in good)
    missing = [r for r in rows if r["error"]]
    assert [r["key"] for r in missing] == ["00002.tar"] and "tar not read" in missing[0]["error"]


@pytest.mark.parametrize("pattern, why", [("{00000..00003}.jpg", "tar shards"), ("{00005..00001}.tar", "upwards")])
def test_a_brace_range_that_names_no_tars_or_runs_backwards_is_refused(tmp_path, pattern, why):
    with pytest.raises(SpecError, match=why):
        plan(normalize_uri(str(tmp_path)) + "/" + pattern, 1000, ObjectStore(Settings()))
