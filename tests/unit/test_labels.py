"""Labeled inputs for finetune/evaluate: ImageFolder prefixes, CSV and JSONL manifests, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.labeledsources import LabeledItem
from orchestrator.inputs.labels import check_val_labels, class_names, load_labeled
from orchestrator.store.storage import ObjectStore, join, normalize_uri

PNG = b"\x89PNG\r\n\x1a\n not decoded here"


def touch(root: Path, *keys: str) -> Path:
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(PNG)
    return root


def labeled(uri: Path | str) -> list[LabeledItem]:
    return load_labeled(normalize_uri(str(uri)), ObjectStore(Settings()))


def test_an_image_folder_labels_each_image_by_its_class_folder(tmp_path):
    touch(tmp_path, "dog/b.png", "cat/a.jpg", "cat/x/nested.png", "dog/readme.txt", "notes.png", "cat/.hidden.png")
    items = labeled(tmp_path)
    assert [(i.key, i.label) for i in items] == [("cat/a.jpg", "cat"), ("cat/x/nested.png", "cat"),
                                                 ("dog/b.png", "dog")]
    assert items[0].uri == join(normalize_uri(str(tmp_path)), "cat/a.jpg")
    assert class_names(items) == ["cat", "dog"]


def test_a_csv_manifest_resolves_keys_against_its_own_folder(tmp_path):
    touch(tmp_path, "imgs/1.png", "imgs/2.png")
    (tmp_path / "labels.csv").write_text("key,label\nimgs/2.png,dog\nimgs/1.png, cat \n\n")
    items = labeled(tmp_path / "labels.csv")
    assert [(i.key, i.label) for i in items] == [("imgs/1.png", "cat"), ("imgs/2.png", "dog")]
    assert items[0].uri == join(normalize_uri(str(tmp_path)), "imgs/1.png")


def test_a_jsonl_manifest_accepts_integer_labels(tmp_path):
    lines = [{"key": "a.png", "label": 3}, {"key": "b.png", "label": "7", "extra": 1}]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [(i.key, i.label) for i in labeled(tmp_path / "labels.jsonl")] == [("a.png", "3"), ("b.png", "7")]


def test_a_missing_labels_file_is_a_spec_error_naming_it(tmp_path):
    with pytest.raises(SpecError, match=r"labels file .*labels\.csv does not exist"):
        labeled(tmp_path / "labels.csv")


def test_a_missing_input_folder_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        labeled(tmp_path / "nowhere")


def test_a_manifest_row_without_a_label_is_a_spec_error_with_its_line(tmp_path):
    (tmp_path / "labels.csv").write_text("key,label\na.png,cat\nb.png,\n")
    with pytest.raises(SpecError, match=r"line 3: key 'b.png' has no label"):
        labeled(tmp_path / "labels.csv")
    (tmp_path / "labels.jsonl").write_text('{"key": "a.png", "label": "cat"}\n{"key": "b.png"}\n')
    with pytest.raises(SpecError, match=r"line 2: key 'b.png' has no label"):
        labeled(tmp_path / "labels.jsonl")


def test_a_csv_without_the_key_label_header_is_a_spec_error(tmp_path):
    (tmp_path / "labels.csv").write_text("a.png,cat\nb.png,dog\n")
    with pytest.raises(SpecError, match="header key,label"):
        labeled(tmp_path / "labels.csv")


def test_a_manifest_key_escaping_its_folder_is_refused(tmp_path):
    (tmp_path / "labels.csv").write_text("key,label\n../secret.png,cat\nb.png,dog\n")
    with pytest.raises(SpecError, match="escapes the manifest's folder"):
        labeled(tmp_path / "labels.csv")


def test_a_key_listed_twice_is_a_spec_error(tmp_path):
    (tmp_path / "labels.csv").write_text("key,label\na.png,cat\na.png,dog\n")
    with pytest.raises(SpecError, match="already appeared on line 2"):
        labeled(tmp_path / "labels.csv")


def test_a_class_folder_without_images_is_a_spec_error_naming_the_class(tmp_path):
    touch(tmp_path, "one/a.png", "two/b.png", "seven/notes.txt")
    with pytest.raises(SpecError, match=r"class 'seven' has no images under"):
        labeled(tmp_path)


def test_a_single_class_is_a_spec_error(tmp_path):
    touch(tmp_path, "cat/a.png", "cat/b.png")
    with pytest.raises(SpecError, match="at least 2"):
        labeled(tmp_path)


def test_a_folder_without_images_is_a_spec_error(tmp_path):
    touch(tmp_path, "cat/a.txt", "dog/b.txt")
    with pytest.raises(SpecError, match="no labeled images"):
        labeled(tmp_path)


def items_of(counts: dict[str, int]) -> list[LabeledItem]:
    return [LabeledItem(f"{label}/{i:03d}.png", f"file:///d/{label}/{i:03d}.png", label)
            for label, n in counts.items() for i in range(n)]


def test_val_labels_missing_from_train_are_named():
    with pytest.raises(SpecError, match="not in the training data: eel, fox"):
        check_val_labels({"cat", "dog"}, items_of({"cat": 1, "fox": 1, "eel": 2}))
    check_val_labels({"cat", "dog"}, items_of({"cat": 3}))
