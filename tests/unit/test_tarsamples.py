"""Webdataset's own rule, checked against webdataset itself: a member's sample key and field
(`base_plus_ext`), consecutive members grouped into samples (`group_by_keys`), and a sample's fields."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest
from webdataset import tariterators

from orchestrator.inputs.tarsamples import Sample, base_plus_ext, kept_type, lookup, read_samples

NAMES = ["x.jpg", "x.seg.png", "x.cls", "b.000.jpg", "b.001.jpg", "img.v1.jpg", "dir/a.b/c.d.PNG", "README",
         ".hidden.jpg", "a/.b.jpg", "y.json", "x.txt"]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def webdataset_samples(data: bytes) -> list[dict]:
    files = ({**f, "__url__": "t.tar"} for f in tariterators.tar_file_iterator(io.BytesIO(data)))
    return list(tariterators.group_by_keys(files))


@pytest.mark.parametrize("name", NAMES)
def test_a_member_name_splits_into_sample_key_and_field_as_webdataset_splits_it(name):
    theirs = tariterators.base_plus_ext(name)
    assert base_plus_ext(name) == (None if theirs == (None, None) else theirs)


def test_members_group_into_the_samples_webdataset_yields_in_the_same_order():
    data = tar_bytes([(name, name.encode()) for name in NAMES] + [("__meta__", b"m"), ("z/README", b"r")])
    theirs = webdataset_samples(data)
    ours = read_samples(data, lambda _: True, 1 << 20, 1 << 20)
    assert [s.key for s in ours] == [s["__key__"] for s in theirs] == ["x", "b", "img", "dir/a.b/c", "a/", "y", "x"]
    assert [list(s.fields) for s in ours] == [[k for k in s if not k.startswith("__")] for s in theirs]
    assert [{k: m.data for k, m in s.fields.items()} for s in ours] == [
        {k: v for k, v in s.items() if not k.startswith("__")} for s in theirs]
    assert [s.problem is not None for s in ours] == [False] * 6 + [True]  # `x` again, after other samples
    assert "duplicate sample key 'x'" in (ours[-1].problem or "")


def test_a_field_twice_in_one_sample_is_the_samples_problem_where_webdataset_raises():
    data = tar_bytes([("x.jpg", b"1"), ("x.JPG", b"2"), ("y.jpg", b"3")])
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(data)
    ours = read_samples(data, lambda _: True, 1 << 20, 1 << 20)
    assert [s.key for s in ours] == ["x", "y"] and ours[0].fields["jpg"].data == b"1"
    assert "duplicate member 'x.JPG'" in (ours[0].problem or "") and ours[1].problem is None


def test_the_image_is_the_first_usual_image_field_unless_one_is_named():
    sample = Sample("x", {name: None for name in ("seg.png", "png", "jpg", "cls")})  # type: ignore[misc]
    assert sample.image_field(None) == "jpg" and sample.image_field("seg.png") == sample.image_field("SEG.PNG") == "seg.png"
    assert Sample("m", {"seg.png": None}).image_field(None) is None  # type: ignore[dict-item]
    assert sample.image_field("webp") is None


def test_fields_are_members_or_paths_into_the_json_member():
    data = tar_bytes([("x.jpg", b"J"), ("x.cls", b"3\n"), ("x.json", json.dumps(
        {"caption": "a cat", "key": "000007", "meta": {"w": 32}}).encode())])
    sample = read_samples(data, lambda _: True, 1 << 20, 1 << 20)[0]
    assert lookup(sample, "cls") == b"3\n" and lookup(sample, "jpg") == b"J"
    assert lookup(sample, "caption") == lookup(sample, "json.caption") == "a cat"
    assert lookup(sample, "json.meta.w") == lookup(sample, "meta.w") == 32
    assert lookup(sample, "key") == "000007" and lookup(sample, "nope") is None and lookup(sample, "txt") is None
    assert (kept_type("seg.png"), kept_type("caption"), kept_type("json.meta.w")) == (pa.binary(), pa.string(),
                                                                                     pa.string())


def test_only_the_fields_asked_for_are_read_the_rest_only_counted():
    data = tar_bytes([("x.jpg", b"J"), ("x.seg.png", b"mask"), ("x.cls", b"1")])
    sample = read_samples(data, lambda name: name == "cls", 1 << 20, 1 << 20)[0]
    assert list(sample.fields) == ["jpg", "seg.png", "cls"]
    assert [m.data for m in sample.fields.values()] == [None, None, b"1"]
