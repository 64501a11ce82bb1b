"""A job reads only its input, and every bad item is one row: listing, reading, tars, models, specs.

Real code over real files (ObjectStore over file://, the planner, the in-process pipeline,
tarfile, transformers and timm); nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import ObjectUnreadable, OutsideInput, SpecError
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.checks.models import check_model_options
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.store.scope import input_root, outside_input
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers import models
from workers.decode.preprocess import Decoder
from workers.decode.tarshards import expand
from workers.errors import ModelLoadError, UnsafeCheckpoint
from workers.heads import ClassifyHead
from workers.pipeline import DecodePath
from workers.runner import run_with
from workers.stagetimes import StageTimes


def png(value: int = 40, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(buffer, "PNG")
    return buffer.getvalue()


def uri(path: Path) -> str:
    return normalize_uri(str(path))


@pytest.fixture(scope="module")
def hf_model(hf_model_dir) -> models.LoadedModel:
    return load_model(normalize_model_ref(str(hf_model_dir)), device="cpu")


def run(model, items: list[Item], scope: str | None = None, blobs=None) -> list[dict]:
    head = ClassifyHead(model, 0, 3)
    run_with(model, ObjectStore(Settings()), items, head, DecodePath(Decoder(model.prep, 1_000_000)), StageTimes(),
             batch_size=4, read_concurrency=2, max_bytes=1 << 20, scope=scope, blobs=blobs)
    return head.ordered_rows()


# -- listing a local input -----------------------------------------------------------------------
def test_a_symlink_loop_in_the_input_is_skipped_and_counted_and_the_listing_goes_on(tmp_path):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(png())
    (images / "sub" / "b.png").write_bytes(png(90))
    os.symlink("loop-2.png", images / "loop-1.png")  # ELOOP when followed
    os.symlink("loop-1.png", images / "loop-2.png")
    os.symlink("..", images / "sub" / "up")  # a folder link back to its own parent

    job_plan = plan(uri(images), 10, ObjectStore(Settings()))

    assert [item.key for item in job_plan.items] == ["a.png", "sub/b.png"]
    summary = job_plan.summary()
    assert summary["skipped"] == 3, summary
    assert any("loop-1.png" in line and "loop" in line for line in job_plan.skipped), job_plan.skipped
    assert any(line.startswith("sub/up:") and "loop" in line for line in job_plan.skipped), job_plan.skipped


def test_a_symlink_to_a_file_outside_the_input_is_not_listed_and_one_inside_is(tmp_path):
    images, outside = tmp_path / "in", tmp_path / "private"
    images.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(7))
    (images / "real.png").write_bytes(png())
    os.symlink(outside / "secret.png", images / "escape.png")
    os.symlink(images / "real.png", images / "alias.png")
    (images / "shared").symlink_to(images / "folder")  # a folder link that stays inside
    (images / "folder").mkdir()
    (images / "folder" / "c.png").write_bytes(png(3))

    job_plan = plan(uri(images), 10, ObjectStore(Settings()))

    keys = [item.key for item in job_plan.items]
    assert keys == ["alias.png", "folder/c.png", "real.png", "shared/c.png"]
    assert "escape.png" not in keys
    assert [line.split(":")[0] for line in job_plan.skipped] == ["escape.png"]
    assert "outside the input" in job_plan.skipped[0]


@pytest.mark.timeout(60)
def test_a_fifo_named_png_is_never_opened_by_the_listing_or_the_reader(tmp_path, hf_model):
    images = tmp_path / "in"
    images.mkdir()
    (images / "ok.png").write_bytes(png())
    os.mkfifo(images / "pipe.png")  # opening it for reading would block until a writer comes

    job_plan = plan(uri(images), 10, ObjectStore(Settings()))
    assert [item.key for item in job_plan.items] == ["ok.png"]
    assert job_plan.summary()["skipped"] == 1 and "FIFO" in job_plan.skipped[0]

    # A manifest line naming the FIFO anyway: an error row, and the shard finishes.
    fifo = Item(key="pipe.png", uri=uri(images / "pipe.png"))
    rows = run(hf_model, [fifo, *job_plan.items], scope=uri(images))
    assert "not a regular file" in rows[0]["error"] and rows[0]["label"] is None
    assert rows[1]["error"] is None


def test_an_unlistable_folder_does_not_abort_the_listing(tmp_path):
    images = tmp_path / "in"
    (images / "deep").mkdir(parents=True)
    (images / "a.png").write_bytes(png())
    # A path longer than PATH_MAX cannot be listed (ENAMETOOLONG) however it was made.
    folder = images / "deep"
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            next_fd = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)

    job_plan = plan(uri(images), 10, ObjectStore(Settings()))

    assert [item.key for item in job_plan.items] == ["a.png"]
    assert job_plan.skipped and "name too long" in job_plan.skipped[-1], job_plan.skipped


# -- reading: the worker checks every item against the job's input ---------------------------
def test_the_planner_and_the_worker_share_one_scope_rule(tmp_path):
    root = uri(tmp_path / "in")
    assert outside_input(root + "/a/b.png", root) is None
    assert "outside the job's input" in outside_input("s3://other/secret.png", root)
    assert "outside the job's input" in outside_input(uri(tmp_path / "in-other" / "x.png"), root)
    assert "'..'" in outside_input(root + "/a/../../etc/passwd", root)
    assert outside_input("s3://b/in/a#1.png", "s3://b/in") is None
    assert "'..'" in outside_input("s3://b/in/../x.png", "s3://b/in")
    assert input_root("s3://b/lists/all.jsonl") == "s3://b/lists"
    assert input_root("s3://b/in/") == "s3://b/in"


def test_forged_items_outside_the_input_become_error_rows_and_are_never_read(tmp_path, hf_model):
    images, outside = tmp_path / "in", tmp_path / "private"
    images.mkdir()
    outside.mkdir()
    (images / "ok.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png(9))
    forged = [
        Item(key="ok.png", uri=uri(images / "ok.png")),
        Item(key="local.png", uri=uri(outside / "secret.png")),
        Item(key="dotdot.png", uri=uri(images) + "/../private/secret.png"),
        Item(key="bucket.png", uri="s3://another-bucket/secret.png"),
    ]
    rows = run(hf_model, forged, scope=input_root(uri(images)))
    assert rows[0]["error"] is None
    for row in rows[1:]:
        assert row["label"] is None and "job's input" in row["error"], row


def test_a_symlink_swapped_in_after_planning_is_refused_on_the_opened_file(tmp_path, hf_model):
    images, outside = tmp_path / "in", tmp_path / "private"
    images.mkdir()
    outside.mkdir()
    (images / "a.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png(9))
    items = plan(uri(images), 10, ObjectStore(Settings())).items
    (images / "a.png").unlink()
    os.symlink(outside / "secret.png", images / "a.png")

    with pytest.raises(OutsideInput):
        ObjectStore(Settings()).read(items[0].uri, within=uri(images))
    rows = run(hf_model, items, scope=uri(images))
    assert "outside the job's input" in rows[0]["error"] and rows[0]["label"] is None


def test_local_read_errors_retrying_cannot_fix_are_error_rows_with_the_reason(tmp_path, hf_model):
    images = tmp_path / "in"
    images.mkdir()
    (images / "ok.png").write_bytes(png())
    os.symlink("self.png", images / "self.png")  # ELOOP
    items = [
        Item(key="loop.png", uri=uri(images / "self.png")),
        Item(key="long.png", uri=uri(images) + "/" + "n" * 300 + ".png"),  # ENAMETOOLONG
        Item(key="ok.png", uri=uri(images / "ok.png")),
    ]
    with pytest.raises(ObjectUnreadable, match="symlink loop"):
        ObjectStore(Settings()).read(items[0].uri)
    rows = run(hf_model, items, scope=uri(images))
    assert "symlink loop" in rows[0]["error"]
    assert "name too long" in rows[1]["error"]
    assert rows[2]["error"] is None


# -- keys exactly as written, end to end ----------------------------------------------------------
ODD_NAMES = ["a#1.png", "b?x=1.png", "c%2Fd.png", "e f.png", "ü-ñ.png", "#lead.png"]


def _manifest_text() -> str:
    """Plain lines, a comment, and a JSON line for the key that starts with '#'."""
    lines = ["# a comment line", *ODD_NAMES[:-1], json.dumps({"key": ODD_NAMES[-1]})]
    return "\n".join(lines) + "\n"


@pytest.fixture
def s3_store(s3_endpoint, s3) -> tuple[ObjectStore, str]:
    from orchestrator.config import Settings

    s3.create_bucket(Bucket="vitbatch-keys")
    return ObjectStore(Settings(s3_endpoint_url=s3_endpoint)), "vitbatch-keys"


def test_keys_with_hash_question_mark_percent_space_and_unicode_are_listed_and_read_as_written(
        s3_store, s3, tmp_path):
    local = tmp_path / "in"
    local.mkdir()
    for i, name in enumerate(ODD_NAMES):
        (local / name).write_bytes(png(i))
    (local / "list.txt").write_text(_manifest_text())
    local_plan = plan(uri(local / "list.txt"), 10, ObjectStore(Settings()))
    assert [item.key for item in local_plan.items] == ODD_NAMES
    assert [ObjectStore(Settings()).read(item.uri) for item in local_plan.items] == [png(i) for i in range(len(ODD_NAMES))]

    store, bucket = s3_store
    for i, name in enumerate(ODD_NAMES):
        s3.put_object(Bucket=bucket, Key=f"odd/{name}", Body=png(i))
    s3.put_object(Bucket=bucket, Key="odd/list.txt", Body=_manifest_text().encode())

    listed = plan(f"s3://{bucket}/odd/", 10, store)
    from_manifest = plan(f"s3://{bucket}/odd/list.txt", 10, store)

    assert sorted(item.key for item in listed.items) == sorted(ODD_NAMES)
    assert [item.key for item in from_manifest.items] == ODD_NAMES
    for job_plan in (listed, from_manifest):
        by_key = {item.key: store.read(item.uri) for item in job_plan.items}
        assert by_key == {name: png(i) for i, name in enumerate(ODD_NAMES)}


def test_an_s3_output_prefix_with_hash_keeps_every_object_under_it(s3_store, s3):
    store, bucket = s3_store
    spec = parse_spec({"kind": "classify", "input": f"s3://{bucket}/odd/", "output": f"s3://{bucket}/out#x?y=1/",
                       "model": "hf:org/model"})
    assert spec.output == f"s3://{bucket}/out#x?y=1/"
    from orchestrator.store.storage import join

    for name in ("_job.json", "part-00000.parquet"):
        store.write(join(spec.output, name), b"{}")
    keys = sorted(obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out")["Contents"])
    assert keys == ["out#x?y=1/_job.json", "out#x?y=1/part-00000.parquet"]
    assert [info.uri for info in store.list(spec.output)] == [join(spec.output, "_job.json"),
                                                              join(spec.output, "part-00000.parquet")]


# -- tars ---------------------------------------------------------------------------------------------
def _tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_two_tar_samples_of_one_key_never_share_a_key(tmp_path):
    (tmp_path / "s.tar").write_bytes(_tar_bytes([("x.png", png(1)), ("y.png", png(2)), ("x.png", png(3))]))
    tar = Item(key="s.tar", uri=uri(tmp_path / "s.tar"), tar=True)

    items, blobs = expand(tar, ObjectStore(Settings()), 1 << 20, 1 << 20)

    assert [item.key for item in items] == ["s.tar/x", "s.tar/y", "s.tar/x#2"]  # webdataset's samples x, y, x
    assert blobs[items[0].uri] == png(1)
    assert "duplicate sample key 'x'" in blobs[items[2].uri]


def test_a_gzip_tar_is_planned_as_a_tar_and_its_uncompressed_size_is_capped(tmp_path):
    small = _tar_bytes([("a.png", png(1))], mode="w:gz")
    bomb = _tar_bytes([("a.png", png(1)), ("zeros.png", bytes(4 << 20))], mode="w:gz")  # 4 MiB of zeros
    (tmp_path / "small.tgz").write_bytes(small)
    (tmp_path / "bomb.tar.gz").write_bytes(bomb)
    assert len(bomb) < 64 << 10  # well under the cap as stored

    job_plan = plan(uri(tmp_path), 10, ObjectStore(Settings()))
    assert [(t.key, t.tar) for t in job_plan.tars] == [("bomb.tar.gz", True), ("small.tgz", True)]

    items, blobs = expand(job_plan.tars[1], ObjectStore(Settings()), 1 << 20, 1 << 20)
    assert [i.key for i in items] == ["small.tgz/a"] and blobs[items[0].uri] == png(1)
    items, blobs = expand(job_plan.tars[0], ObjectStore(Settings()), 1 << 20, 8 << 20)
    assert [i.key for i in items] == ["bomb.tar.gz"], "over the cap: one error row under the tar's key"
    assert "uncompressed" in blobs[items[0].uri] and "cap" in blobs[items[0].uri]


def test_a_corrupt_or_missing_tar_is_one_error_row_not_a_failed_shard(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar archive at all" * 40)
    for name in ("bad.tar", "gone.tar"):
        items, blobs = expand(Item(key=name, uri=uri(tmp_path / name), tar=True), ObjectStore(Settings()), 1 << 20, 1 << 20)
        assert [i.key for i in items] == [name]
        assert isinstance(blobs[items[0].uri], str) and blobs[items[0].uri]


# -- models -----------------------------------------------------------------------------------------
def _edited_copy(source: Path, dest: Path, **changes) -> Path:
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_an_unknown_model_type_fails_to_load_once_with_the_reason(hf_model_dir, tmp_path):
    broken = _edited_copy(hf_model_dir, tmp_path / "unknown", model_type="no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(normalize_model_ref(str(broken)), device="cpu")


def test_a_remote_code_config_is_refused_before_transformers_sees_it(hf_model_dir, tmp_path):
    remote = _edited_copy(hf_model_dir, tmp_path / "remote",
                          auto_map={"AutoModelForImageClassification": "modeling_evil.EvilModel"})
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_model(normalize_model_ref(str(remote)), device="cpu")


def test_a_folder_with_safetensors_and_pickle_weights_loads_the_safetensors(hf_model_dir, timm_model_dir, tmp_path):
    reference = load_model(normalize_model_ref(str(hf_model_dir)), device="cpu").fingerprint
    both = tmp_path / "both-hf"
    shutil.copytree(hf_model_dir, both)
    (both / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail")
    assert load_model(normalize_model_ref(str(both)), device="cpu").fingerprint == reference

    timm_both = tmp_path / "both-timm"
    shutil.copytree(timm_model_dir, timm_both)
    (timm_both / "pytorch_model.bin").write_bytes(b"not a pickle either")
    load_model(normalize_model_ref(f"timm:{timm_both}"), device="cpu")
    # timm would take pytorch_model.bin before a safetensors file of another name: refused.
    (timm_both / "model.safetensors").rename(timm_both / "weights.safetensors")
    with pytest.raises(UnsafeCheckpoint, match="model.safetensors"):
        load_model(normalize_model_ref(f"timm:{timm_both}"), device="cpu")


def test_finetunings_starting_model_obeys_the_safetensors_rule(hf_model_dir, tmp_path):
    import torch

    from orchestrator.config import Settings
    from workers.context import WorkerContext
    from workers.training.finetune import build_model

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(hf_model_dir / name, pickled)
    torch.save(load_model(normalize_model_ref(str(hf_model_dir)), device="cpu").module.state_dict(),
               pickled / "pytorch_model.bin")
    spec = parse_spec({"kind": "finetune", "train": str(tmp_path), "output": str(tmp_path / "out"),
                       "model": str(pickled)})
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        build_model(spec, ["a", "b"], WorkerContext(Settings(model_cache_dir=str(tmp_path / "cache"))))


# -- specs and submit-time model checks -------------------------------------------------------------
def _spec(kind: str, model: Path, **options):
    return parse_spec({"kind": kind, "input": "/data", "output": "/out", "model": str(model), **options})


def test_layers_and_top_k_beyond_the_model_are_refused_at_submit(hf_model_dir):
    config = json.loads((hf_model_dir / "config.json").read_text())  # 2 layers, 5 labels
    check_model_options(_spec("attention", hf_model_dir, layers="0,-2"), config)
    with pytest.raises(SpecError, match="--layers 99: the model has 2 layers"):
        check_model_options(_spec("attention", hf_model_dir, layers="0,99"), config)
    with pytest.raises(SpecError, match="top_k=6 is larger than the model's 5 labels"):
        check_model_options(_spec("classify", hf_model_dir, top_k=6), config)


def test_an_unknown_architecture_or_remote_code_is_refused_at_submit(hf_model_dir):
    config = json.loads((hf_model_dir / "config.json").read_text())
    check_model_options(_spec("classify", hf_model_dir), config)
    with pytest.raises(SpecError, match="no-such-model"):
        check_model_options(_spec("classify", hf_model_dir), {**config, "model_type": "no-such-model"})
    with pytest.raises(SpecError, match="auto_map"):
        check_model_options(_spec("classify", hf_model_dir), {**config, "auto_map": {"AutoModel": "x.Y"}})


@pytest.mark.parametrize("config", [
    {"architecture": "vit_tiny_patch16_224", "checkpoint_path": "/tmp/evil.pth"},
    {"architecture": "vit_tiny_patch16_224", "pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}},
])
def test_config_keys_that_name_files_are_refused(config):
    with pytest.raises(SpecError, match="may not name files"):
        parse_spec({"kind": "finetune", "train": "/data", "output": "/out", "config": json.dumps(config)})


@pytest.mark.parametrize("output, reason", [
    ("s3://bucket/out\x07/", "control characters"),
    ("s3://bad#bucket/out/", "not a valid S3 bucket name"),
    ("s3://bucket/" + "k" * 900 + "/", "shorter prefix"),
    ("/tmp/" + "n" * 300, "file names hold at most 255"),
    ("/tmp/out\n/", "control characters"),
])
def test_output_prefixes_a_store_cannot_hold_are_refused(output, reason):
    with pytest.raises(SpecError, match=reason):
        parse_spec({"kind": "classify", "input": "/data", "output": output, "model": "hf:org/model"})
