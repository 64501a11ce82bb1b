"""Arrow IPC streams indexed from their message headers alone (orchestrator/inputs/arrowstreams.py): record batches
found with their rows and read back one at a time, in the stream and the file format; anything else refused."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from orchestrator.config import Settings
from orchestrator.inputs.arrowstreams import read_batch, read_stream_index
from orchestrator.inputs.parquetinputs import ReadStats
from orchestrator.store.storage import ObjectStore, normalize_uri

TABLE = pa.table({"image": [bytes([i]) * (100 + i) for i in range(10)], "label": list(range(10))})


def write(path: Path, file_format: bool = False, table: pa.Table = TABLE) -> str:
    with (pa.ipc.new_file if file_format else pa.ipc.new_stream)(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    return normalize_uri(str(path))


@pytest.mark.parametrize("file_format", [False, True])
def test_batches_are_indexed_from_headers_and_read_back_one_at_a_time(tmp_path, file_format):
    uri, store, stats = write(tmp_path / "t.arrow", file_format), ObjectStore(Settings()), ReadStats()
    size = (tmp_path / "t.arrow").stat().st_size
    index = read_stream_index(store, uri, size, stats=stats)
    assert [batch.rows for batch in index.batches] == [3, 3, 3, 1] and index.schema.names == ["image", "label"]
    assert stats.requests == 1 + 1 + 4 + 1  # the magic, the schema, each batch header, the end of the stream
    batches = [read_batch(store, uri, index, n) for n in range(4)]
    assert pa.Table.from_batches(batches).equals(TABLE)


def test_a_cut_stream_garbage_and_dictionary_batches_are_refused(tmp_path):
    store = ObjectStore(Settings())
    write(tmp_path / "whole.arrow")
    data = (tmp_path / "whole.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[:len(data) - 200])
    (tmp_path / "garbage.arrow").write_bytes(b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x00" * 40)
    (tmp_path / "tiny.arrow").write_bytes(b"ARR")
    (tmp_path / "negative.arrow").write_bytes(b"\xff\xff\xff\xff\xf0\xff\xff\xff" + b"\x00" * 40)
    words = pa.table({"word": pa.array(["a", "b", "a"]).dictionary_encode()})
    write(tmp_path / "dict.arrow", table=words)
    for name, reason in (("cut", "cut short"), ("garbage", "malformed|no schema"), ("tiny", "3 bytes"),
                         ("negative", "negative or over"),
                         ("dict", "dictionary-encoded")):
        path = tmp_path / f"{name}.arrow"
        with pytest.raises(ValueError, match=reason):
            read_stream_index(store, normalize_uri(str(path)), path.stat().st_size)
