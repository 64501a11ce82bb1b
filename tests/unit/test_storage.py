"""ObjectStore and URI helpers over file:// (a tmp directory); S3 is covered by integration tests."""

from __future__ import annotations

import os

import pytest

from orchestrator.config import Settings
from orchestrator.errors import ObjectNotFound, ObjectTooLarge, StorageError, UnsafeKey
from orchestrator.store.storage import ObjectStore, join, normalize_uri, relative_key


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore(Settings())


@pytest.fixture
def root(tmp_path) -> str:
    return normalize_uri(str(tmp_path))


def test_what_is_written_reads_back(store, root):
    uri = join(root, "a", "b", "blob.bin")
    store.write(uri, b"\x00payload\xff")
    assert store.read(uri) == b"\x00payload\xff"
    assert store.exists(uri)


def test_writing_leaves_no_temporary_files(store, root, tmp_path):
    uri = join(root, "out", "part-00000.parquet")
    for size in (10, 3, 1000):
        store.write(uri, b"x" * size)
    assert sorted(os.listdir(tmp_path / "out")) == ["part-00000.parquet"]


def test_a_listing_during_another_writers_write_shows_only_whole_objects(store, root, tmp_path, monkeypatch):
    """A reader listing _commits/ while a worker writes a marker must not see its half-written temporary."""
    listed = []
    real_replace = os.replace

    def list_then_replace(src, dst):  # the moment between writing the bytes and renaming them into place
        listed.extend(info.uri for info in store.list(join(root, "_commits")))
        real_replace(src, dst)

    store.write(join(root, "_commits", "part-00000.json"), b"{}")
    monkeypatch.setattr(os, "replace", list_then_replace)
    store.write(join(root, "_commits", "part-00001.json"), b"{}")
    assert listed == [join(root, "_commits", "part-00000.json")]
    assert len(os.listdir(tmp_path / "_commits")) == 2


def test_overwriting_replaces_the_whole_content(store, root):
    uri = join(root, "obj")
    store.write(uri, b"a much longer first version")
    store.write(uri, b"short")
    assert store.read(uri) == b"short"


def test_a_failed_write_keeps_the_old_object_and_leaves_no_temporary(store, root, tmp_path):
    uri = join(root, "obj")
    store.write(uri, b"old")
    with pytest.raises(TypeError):  # the temporary is created, then writing into it fails
        store.write(uri, "text, not bytes")
    assert store.read(uri) == b"old"
    assert os.listdir(tmp_path) == ["obj"]


def test_listing_is_sorted_recursive_and_gives_size_and_etag(store, root):
    for key, data in [("b.png", b"22"), ("a/z.png", b"1"), ("a/b/c.png", b"333"), ("0.png", b""), ("a.png", b"4444"), ("a-b.png", b"55555")]:
        store.write(join(root, key), data)
    infos = list(store.list(root))
    # Full-key order, as S3 lists: '-' < '.' < '/', and a folder's files do not come first.
    listed = [relative_key(root, i.uri) for i in infos]
    assert listed == ["0.png", "a-b.png", "a.png", "a/b/c.png", "a/z.png", "b.png"]
    assert [i.size for i in infos] == [0, 5, 4, 3, 1, 2]
    assert all(i.etag for i in infos)


def test_the_etag_changes_when_the_content_changes(store, root):
    uri = join(root, "img.png")
    store.write(uri, b"version-1")
    (first,) = store.list(root)
    store.write(uri, b"version-2")  # same size: only the content differs
    (second,) = store.list(root)
    assert first.etag != second.etag


def test_listing_a_missing_directory_raises_object_not_found(store, root):
    with pytest.raises(ObjectNotFound):
        list(store.list(join(root, "missing")))


def test_reading_over_max_bytes_raises_object_too_large(store, root):
    uri = join(root, "big")
    store.write(uri, b"x" * 101)
    with pytest.raises(ObjectTooLarge, match="101"):
        store.read(uri, max_bytes=100)
    assert store.read(uri, max_bytes=101) == b"x" * 101


def test_reading_a_missing_object_raises_object_not_found(store, root):
    with pytest.raises(ObjectNotFound):
        store.read(join(root, "nope.png"))
    assert not store.exists(join(root, "nope.png"))


def test_reading_a_directory_raises_object_not_found(store, root):
    store.write(join(root, "dir", "x"), b"1")
    with pytest.raises(ObjectNotFound):
        store.read(join(root, "dir"))


@pytest.mark.parametrize("key", ["..", "../x.png", "a/../../x.png", "", "a//b", "/etc/passwd", "a/./b",
                                 "a\\b.png", "..\\x.png", "a/\x00.png"])
def test_join_refuses_keys_that_could_escape_the_prefix(root, key):
    with pytest.raises(UnsafeKey):
        join(root, key)


def test_unsafe_key_is_a_storage_error():
    assert issubclass(UnsafeKey, StorageError)


def test_join_percent_encodes_file_keys_and_they_read_back(store, root, tmp_path):
    uri = join(root, "sub dir", "ünï cødé.png")
    assert " " not in uri and "ü" not in uri
    store.write(uri, b"png bytes")
    assert (tmp_path / "sub dir" / "ünï cødé.png").read_bytes() == b"png bytes"
    assert store.read(uri) == b"png bytes"


def test_join_keeps_s3_keys_as_written():
    assert join("s3://bucket/pre/", "a b/ü.png") == "s3://bucket/pre/a b/ü.png"


@pytest.mark.parametrize("key", ["x.png", "a/b/c.jpg", "ünï cødé.png", "100%.png", "a%20b.png", "q?#.png"])
def test_relative_key_inverts_join(root, key):
    assert relative_key(root, join(root, key)) == key
    assert relative_key("s3://b/p", join("s3://b/p", key)) == key


def test_relative_key_matches_listed_uris(store, root):
    store.write(join(root, "ünï cødé.png"), b"1")
    (info,) = store.list(root)
    assert relative_key(root, info.uri) == "ünï cødé.png"


def test_relative_key_refuses_a_uri_outside_the_prefix(root):
    with pytest.raises(UnsafeKey):
        relative_key(join(root, "a"), join(root, "ab", "x.png"))


def test_relative_paths_normalize_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("imgs") == f"file://{tmp_path}/imgs"
    assert normalize_uri("./imgs/") == f"file://{tmp_path}/imgs/"
    assert normalize_uri("a/../b") == f"file://{tmp_path}/b"
    assert normalize_uri("sp ace") == f"file://{tmp_path}/sp%20ace"


def test_normalize_uri_is_idempotent(tmp_path):
    for location in [str(tmp_path / "ünï" / "x y") + "/", "s3://bucket/p/", f"file://{tmp_path}/a%25b"]:
        once = normalize_uri(location)
        assert normalize_uri(once) == once


@pytest.mark.parametrize("uri", ["ftp://x", "s3://", "s3:///key", "http://h/p", "file://host/path"])
def test_normalize_uri_refuses_unusable_uris(uri):
    with pytest.raises(StorageError):
        normalize_uri(uri)


def test_local_writes_respect_the_umask_not_mkstemps_0600(tmp_path):
    store = ObjectStore(Settings())
    uri = join(normalize_uri(str(tmp_path)), "out", "part-00000.parquet")
    store.write(uri, b"rows")
    mode = (tmp_path / "out" / "part-00000.parquet").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_a_create_only_write_refuses_an_existing_object_and_keeps_it(tmp_path):
    from orchestrator.errors import ObjectExists

    store = ObjectStore(Settings())
    uri = join(normalize_uri(str(tmp_path)), "_job.json")
    store.write(uri, b"first", if_absent=True)
    with pytest.raises(ObjectExists):
        store.write(uri, b"second", if_absent=True)
    assert store.read(uri) == b"first"
    assert sorted(os.listdir(tmp_path)) == ["_job.json"]  # no temporary left behind


def test_an_output_inside_the_jobs_input_is_refused_before_anything_is_written(tmp_path):
    from orchestrator.errors import SpecError
    from orchestrator.jobspec.checks.outputs import check_prefix_free
    from orchestrator.jobspec.jobs import parse_spec

    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "in"), "output": str(tmp_path / "in" / "out"),
                       "model": str(tmp_path / "m")})
    with pytest.raises(SpecError, match="inside the job's input"):
        check_prefix_free(spec, ObjectStore(Settings()), overwrite=True)
    assert not (tmp_path / "in").exists()


@pytest.mark.parametrize("op", ["write", "read", "exists", "delete"])
def test_a_plain_path_is_refused_not_cut_into_a_relative_one(store, tmp_path, monkeypatch, op):
    """A plain path is not a URI: cutting `file://`'s seven characters off `/tmp/...` named a
    relative path (`/tmp/zz-probe/x.json` wrote `./-probe/x.json` in the working directory)."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "zz-probe" / "x.json"
    call = {"write": lambda p: store.write(p, b"{}"), "read": store.read, "exists": store.exists,
            "delete": store.delete}[op]
    with pytest.raises(StorageError, match="not a file:// URI"):
        call(str(target))
    assert list(tmp_path.rglob("*")) == []
