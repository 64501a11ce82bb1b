"""Arrow IPC streams (`datasets`' save_to_disk files, `data-00000-of-00001.arrow`) read like parquet files:
an index of record batches from the messages' headers, then one batch at a time by one ranged read.

A stream has no footer: planning walks its message headers instead, one ranged read per record batch
(`datasets` writes 100-row batches for image datasets; a header is a few hundred bytes), never a body.
A record batch then plays a parquet row group's part: a shard is a run of whole batches, and a
worker reads one batch (its header and body, all columns) when the pipeline asks for its first image.

The header fields read here (Arrow's Message.fbs): Message {version, header_type, header, bodyLength},
RecordBatch {length}; header types 1 Schema, 2 DictionaryBatch, 3 RecordBatch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.store.storage import ObjectStore

FILE_MAGIC = b"ARROW1\x00\x00"  # the IPC file format: a stream between this and a footer
CONTINUATION = 0xFFFFFFFF
HEADER_READ_BYTES = 4096  # a record batch header is smaller; a larger one costs a second read
MAX_HEADER_BYTES = 16 << 20  # a header claiming more is corrupt: never read that much to find out
SCHEMA, DICTIONARY_BATCH, RECORD_BATCH = 1, 2, 3


@dataclass(frozen=True)
class Batch:
    """One record batch of a stream: its message's byte range (header and body) and its rows."""

    offset: int
    size: int
    rows: int


@dataclass(frozen=True)
class StreamIndex:
    """A stream's schema and record batches, from its headers alone."""

    schema: pa.Schema
    batches: tuple[Batch, ...]


def read_stream_index(store: ObjectStore, uri: str, size: int, within: str | None = None, stats=None) -> StreamIndex:
    """Walk the stream's message headers; ValueError when it is not an Arrow IPC stream we can read by batch."""
    if size < 8:
        raise ValueError(f"not an Arrow IPC stream ({size} bytes)")
    offset = len(FILE_MAGIC) if _read(store, uri, 0, len(FILE_MAGIC), within, stats) == FILE_MAGIC else 0
    schema: pa.Schema | None = None
    batches: list[Batch] = []
    while offset + 8 <= size:
        head = _read(store, uri, offset, HEADER_READ_BYTES, within, stats)
        prefix, metadata_bytes = _prefix(head)
        if metadata_bytes == 0:
            break  # end of stream (the file format's footer follows)
        if prefix + metadata_bytes > len(head):
            head = _read(store, uri, offset, prefix + metadata_bytes, within, stats)
        metadata = head[prefix:prefix + metadata_bytes]
        kind, body_bytes, rows = _message(metadata)
        message_bytes = prefix + metadata_bytes + body_bytes
        if kind == SCHEMA:
            schema = pa.ipc.read_schema(pa.py_buffer(head[:prefix + metadata_bytes]))
        elif kind == DICTIONARY_BATCH:
            raise ValueError("a dictionary-encoded Arrow stream: save it with datasets (save_to_disk) or as parquet")
        elif kind == RECORD_BATCH:
            batches.append(Batch(offset, message_bytes, rows))
        offset += message_bytes
    if schema is None:
        raise ValueError("not an Arrow IPC stream (no schema message)")
    if offset > size:
        raise ValueError(f"the Arrow stream is cut short ({size} bytes, its messages run to {offset})")
    return StreamIndex(schema, tuple(batches))


def read_batch(store: ObjectStore, uri: str, index: StreamIndex, number: int, within: str | None = None,
               stats=None) -> pa.RecordBatch:
    """Record batch `number` of the stream, with one ranged read of its message."""
    batch = index.batches[number]
    data = _read(store, uri, batch.offset, batch.size, within, stats)
    message = pa.ipc.read_message(pa.py_buffer(data))
    return pa.ipc.read_record_batch(message, index.schema)


def _read(store: ObjectStore, uri: str, start: int, length: int, within: str | None, stats) -> bytes:
    data = store.read_range(uri, start, length, within=within)
    if stats is not None:
        stats.add(len(data))
    return data


def _prefix(head: bytes) -> tuple[int, int]:
    """(prefix bytes, metadata bytes) of a message: 0xFFFFFFFF then the length, or the length alone (before 0.15)."""
    if len(head) < 8:
        raise ValueError("the Arrow stream ends inside a message header")
    first, second = struct.unpack_from("<Ii", head, 0)
    prefix, metadata_bytes = (8, second) if first == CONTINUATION else (4, struct.unpack_from("<i", head, 0)[0])
    if not 0 <= metadata_bytes <= MAX_HEADER_BYTES:
        raise ValueError(f"a malformed Arrow message header (length {metadata_bytes}, negative or over "
                         f"{MAX_HEADER_BYTES})")
    return prefix, metadata_bytes


def _message(metadata: bytes) -> tuple[int, int, int]:
    """(header type, body bytes, rows) of a Message flatbuffer; rows only for a record batch."""
    try:
        root = struct.unpack_from("<I", metadata, 0)[0]
        kind = _scalar(metadata, root, 1, "<B", 0)
        body = _scalar(metadata, root, 3, "<q", 0)
        rows = 0
        if kind == RECORD_BATCH:
            field = _field(metadata, root, 2)
            if field is None:
                raise ValueError("a record batch message without its header")
            header = field + struct.unpack_from("<I", metadata, field)[0]
            rows = _scalar(metadata, header, 0, "<q", 0)
    except struct.error as e:
        raise ValueError(f"a malformed Arrow message header ({e})") from e
    if body < 0 or rows < 0:
        raise ValueError("a malformed Arrow message header (negative sizes)")
    return kind, body, rows


def _field(buffer: bytes, table: int, number: int) -> int | None:
    """Where field `number` of the flatbuffer table at `table` is stored, or None when it is left out."""
    vtable = table - struct.unpack_from("<i", buffer, table)[0]
    vtable_bytes = struct.unpack_from("<H", buffer, vtable)[0]
    slot = 4 + 2 * number
    if slot >= vtable_bytes:
        return None
    offset = struct.unpack_from("<H", buffer, vtable + slot)[0]
    return table + offset if offset else None


def _scalar(buffer: bytes, table: int, number: int, fmt: str, default: int) -> int:
    at = _field(buffer, table, number)
    return default if at is None else struct.unpack_from(fmt, buffer, at)[0]
