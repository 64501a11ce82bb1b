"""plan(): inputs (a folder or a manifest file) -> deterministic shards of image items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.manifest import Item, read_manifest, write_manifests
from orchestrator.inputs.planner import plan
from orchestrator.store.storage import ObjectStore, join, normalize_uri


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore(Settings())


def touch(root: Path, *keys: str) -> None:
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())  # content is never read by the planner


def keys(items: list[Item]) -> list[str]:
    return [item.key for item in items]


def test_only_image_files_are_planned_and_the_rest_are_counted(tmp_path, store):
    touch(tmp_path, "a.jpg", "b.PNG", "c.webp", "notes.txt", "meta.json", "d.jpeg")
    result = plan(normalize_uri(str(tmp_path)), 10, store)
    assert keys(result.items) == ["a.jpg", "b.PNG", "c.webp", "d.jpeg"]
    assert sorted(result.ignored) == ["meta.json", "notes.txt"]
    assert result.summary()["ignored_non_images"] == 2


def test_items_carry_uri_size_and_etag_from_the_listing(tmp_path, store):
    touch(tmp_path, "sub dir/ü.png")
    (item,) = plan(normalize_uri(str(tmp_path)), 10, store).items
    assert item.key == "sub dir/ü.png"
    assert store.read(item.uri) == "sub dir/ü.png".encode()
    assert item.size == len("sub dir/ü.png".encode()) and item.etag


def test_shards_hold_shard_size_items_in_sorted_key_order(tmp_path, store):
    names = [f"img{i:02d}.png" for i in range(7)] + ["sub/a.jpg", "sub/b.jpg"]
    touch(tmp_path, *reversed(names))
    result = plan(normalize_uri(str(tmp_path)), 4, store)
    shards = [(index, keys(items)) for index, items in result.shards()]
    assert result.n_shards == 3
    assert shards == [(0, names[0:4]), (1, names[4:8]), (2, names[8:9])]


def test_hidden_files_are_skipped(tmp_path, store):
    touch(tmp_path, "a.png", ".DS_Store", ".hidden.png", "sub/.b.png.123.tmp", "sub/c.png")
    result = plan(normalize_uri(str(tmp_path)), 10, store)
    assert keys(result.items) == ["a.png", "sub/c.png"]
    assert result.ignored == []


def test_a_txt_manifest_lists_keys_relative_to_its_folder(tmp_path, store):
    touch(tmp_path, "data/x/1.jpg", "data/x/2.jpg", "data/y/3.png")
    manifest = tmp_path / "data" / "list.txt"
    manifest.write_text("# chosen images\nx/2.jpg\n\n  y/3.png  \nx/1.jpg\n")
    result = plan(normalize_uri(str(manifest)), 10, store)
    assert keys(result.items) == ["x/2.jpg", "y/3.png", "x/1.jpg"]  # manifest order, not sorted
    assert [store.read(item.uri) for item in result.items] == [b"data/x/2.jpg", b"data/y/3.png", b"data/x/1.jpg"]


def test_a_jsonl_manifest_reads_the_key_field(tmp_path, store):
    touch(tmp_path, "imgs/ünï cødé.png", "imgs/b.jpg")
    manifest = tmp_path / "imgs" / "m.jsonl"
    lines = [{"key": "ünï cødé.png", "label": "cat"}, {"key": "b.jpg"}, {"key": "readme.md"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = plan(normalize_uri(str(manifest)), 10, store)
    assert keys(result.items) == ["ünï cødé.png", "b.jpg"]
    assert result.ignored == ["readme.md"]
    assert store.read(result.items[0].uri) == "imgs/ünï cødé.png".encode()


def test_a_jsonl_line_without_a_key_is_a_spec_error_naming_the_line(tmp_path, store):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"key": "a.png"}\n{"path": "b.png"}\n')
    with pytest.raises(SpecError, match="line 2"):
        plan(normalize_uri(str(manifest)), 10, store)


def test_duplicate_keys_are_dropped_first_wins_and_counted(tmp_path, store):
    touch(tmp_path, "a.png", "b.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("b.png\na.png\nb.png\nb.png\n")
    first = plan(normalize_uri(str(manifest)), 10, store)
    again = plan(normalize_uri(str(manifest)), 10, store)
    assert keys(first.items) == ["b.png", "a.png"]
    assert first.duplicates == ["b.png", "b.png"]
    assert first.summary()["duplicate_keys"] == 2
    assert first.items == again.items


@pytest.mark.parametrize("key", ["../secret.png", "x/../../secret.png", "/etc/passwd.png"])
def test_a_manifest_key_that_escapes_its_folder_is_a_spec_error(tmp_path, store, key):
    touch(tmp_path, "data/a.png")
    manifest = tmp_path / "data" / "list.txt"
    manifest.write_text(f"a.png\n{key}\n")
    with pytest.raises(SpecError, match="line 2"):
        plan(normalize_uri(str(manifest)), 10, store)


def test_a_folder_without_images_is_a_spec_error(tmp_path, store):
    touch(tmp_path, "a.txt", "b.csv")
    with pytest.raises(SpecError, match="no image files"):
        plan(normalize_uri(str(tmp_path)), 10, store)


def test_an_empty_folder_is_a_spec_error(tmp_path, store):
    with pytest.raises(SpecError):
        plan(normalize_uri(str(tmp_path)), 10, store)


def test_a_missing_input_folder_is_a_spec_error(tmp_path, store):
    with pytest.raises(SpecError, match="missing"):
        plan(normalize_uri(str(tmp_path / "missing")), 10, store)


def test_manifests_written_then_read_give_back_the_same_items(tmp_path, store):
    touch(tmp_path / "in", *[f"{i}/ü {i}.jpg" for i in range(5)])
    result = plan(normalize_uri(str(tmp_path / "in")), 2, store)
    output = normalize_uri(str(tmp_path / "out"))
    uris = write_manifests(result, output, store)
    assert len(uris) == 3 and all(store.exists(uri) for uri in uris)
    assert uris[0] == join(output, "_manifests", "shard-00000.jsonl")
    for index, items in result.shards():
        assert read_manifest(output, index, store) == items
