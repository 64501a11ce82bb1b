"""Parquet inputs: each row of a `.parquet` object is one image (Hugging Face `datasets`, img2dataset).

Planning reads footers only, through ranged reads (`RangedFile`): the schema says which
column holds the image, the row groups say how many rows there are, and a shard is a run
of whole row groups. Nothing here reads a data page; the worker reads one row group's
image column at a time (workers/decode/parquetshards.py).

The image column is the one the `huggingface` schema metadata types as `Image`, or the
file's only binary or `struct{bytes, path}` column, or the one `--image-column` names.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import (
    ObjectNotFound,
    ObjectUnreadable,
    SpecError,
    StorageError,
)
from orchestrator.inputs.manifest import Item
from orchestrator.store.storage import ObjectStore

PARQUET_SUFFIX = ".parquet"
HF_METADATA_KEY = b"huggingface"


@dataclass
class ReadStats:
    """Ranged reads made through RangedFiles that share this object (tests and benches count them)."""

    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n_bytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += n_bytes


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over one stored object: each read is one ranged read of the store
    (an S3 Range GET, a local pread), so pyarrow fetches only the footer and the column chunks it needs."""

    def __init__(self, store: ObjectStore, uri: str, size: int, within: str | None = None,
                 stats: ReadStats | None = None) -> None:
        super().__init__()
        self.store, self.uri, self.size, self.within = store, uri, size, within
        self.stats = stats
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        """The store's bytes as they come: no bytearray and copy in between (a column chunk may be large)."""
        length = self.size - self.position if size is None or size < 0 else min(size, self.size - self.position)
        if length <= 0:
            return b""
        data = self.store.read_range(self.uri, self.position, length, within=self.within)
        self.position += len(data)
        if self.stats is not None:
            self.stats.add(len(data))
        return data

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self.position)
        if length <= 0:
            return 0
        data = self.store.read_range(self.uri, self.position, length, within=self.within)
        buffer[:len(data)] = data
        self.position += len(data)
        if self.stats is not None:
            self.stats.add(len(data))
        return len(data)


@dataclass(frozen=True)
class ParquetColumns:
    """What a job asks of parquet inputs (from its spec): where the image is, what keys rows, what to copy."""

    image: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()
    label: str | None = None
    image_root: str | None = None  # where absolute `path` cells may point besides the input

    @property
    def asked(self) -> list[str]:
        """The options given, as their flags (to say that they need parquet inputs)."""
        named = {"--image-column": self.image, "--id-column": self.id, "--keep-columns": self.keep,
                 "--label-column": self.label, "--image-root": self.image_root}
        return [flag for flag, value in named.items() if value]


def columns_of(spec) -> ParquetColumns:
    """The parquet options of any job spec (those without them ask for nothing)."""
    return ParquetColumns(image=getattr(spec, "image_column", None), id=getattr(spec, "id_column", None),
                          keep=tuple(getattr(spec, "keep_columns", None) or ()),
                          label=getattr(spec, "label_column", None), image_root=getattr(spec, "image_root", None))


def is_parquet_key(key: str) -> bool:
    return key.lower().endswith(PARQUET_SUFFIX)


def is_table_key(key: str) -> bool:
    """A table whose rows are images: a .parquet file or a datasets save_to_disk .arrow stream (tablefiles.py)."""
    return key.lower().endswith((PARQUET_SUFFIX, ".arrow"))


def read_footer(store: ObjectStore, uri: str, size: int = -1, within: str | None = None,
                stats: ReadStats | None = None) -> pq.FileMetaData:
    """The file's footer (schema, row groups) from its last bytes; ValueError when it is not parquet."""
    size = store.info(uri).size if size < 0 else size
    try:
        return pq.ParquetFile(RangedFile(store, uri, size, within, stats)).metadata
    except (ObjectNotFound, ObjectUnreadable, StorageError):
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"not a readable parquet file ({type(e).__name__}: {e})") from e


def hf_features(schema: pa.Schema) -> dict:
    """The `datasets` features stored in the schema's `huggingface` metadata ({} when absent or unreadable)."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """A `ClassLabel` column's names from the `huggingface` metadata, or None when it is not one."""
    feature = hf_features(schema).get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(name) for name in feature["names"]]
    return None


def is_image_type(kind: pa.DataType) -> bool:
    """binary (img2dataset's `jpg`), or a struct with binary `bytes` and/or string `path` (datasets' Image)."""
    if _is_binary(kind):
        return True
    if not pa.types.is_struct(kind):
        return False
    names = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return ("bytes" in names and _is_binary(names["bytes"])) or (
        "path" in names and (pa.types.is_string(names["path"]) or pa.types.is_large_string(names["path"])))


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def image_column(schema: pa.Schema, uri: str, requested: str | None = None) -> str:
    """The column that holds the images; SpecError saying what to pass when there is none or several."""
    if requested is not None:
        if requested not in schema.names:
            raise SpecError(f"--image-column {requested!r} is not a column of {uri} (it has {', '.join(schema.names)})")
        if not is_image_type(schema.field(requested).type):
            refuse_nested(schema, uri, [requested])
            raise SpecError(f"--image-column {requested!r} of {uri} is {schema.field(requested).type}: expected "
                            "binary, or a struct with bytes (binary) and path (string)")
        return requested
    typed = [name for name, feature in hf_features(schema).items()
             if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names]
    candidates = typed or [name for name in schema.names if is_image_type(schema.field(name).type)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        refuse_nested(schema, uri, nested_image_columns(schema))
        raise SpecError(f"{uri} has no image column (no binary or struct{{bytes, path}} column among "
                        f"{', '.join(schema.names)}): name it with --image-column")
    raise SpecError(f"{uri} has several image columns ({', '.join(candidates)}): pick one with --image-column")


def nested_image_columns(schema: pa.Schema) -> list[str]:
    """Top-level columns that hold images only inside a struct or a list (a `datasets` Image in a dict or
    a List(Image) feature): one row is not one image there."""
    return [name for name in schema.names
            if not is_image_type(schema.field(name).type) and _nested_image(schema.field(name).type) is not None]


def _nested_image(kind: pa.DataType, where: str = "") -> str | None:
    """Where inside `kind` an image type sits ("struct field img", "list element"), or None."""
    if where and is_image_type(kind):
        return where
    if pa.types.is_struct(kind):
        found = (_nested_image(kind.field(i).type, f"struct field {kind.field(i).name!r}")
                 for i in range(kind.num_fields))
        return next((f for f in found if f is not None), None)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _nested_image(kind.value_type, "list element")
    return None


def refuse_nested(schema: pa.Schema, uri: str, names: list[str]) -> None:
    """SpecError naming the first of `names` that holds its images nested; nothing when none does."""
    for name in names:
        where = _nested_image(schema.field(name).type)
        if where is not None:
            raise SpecError(
                f"{uri}: column {name!r} holds its images nested (as a {where}), and vitbatch reads one image per "
                "row from a top-level column: write the images as a column of their own (datasets: "
                "dataset.flatten() for a struct, one row per image for a list) and name it with --image-column")


def check_columns(schema: pa.Schema, uri: str, columns: ParquetColumns) -> str:
    """The image column, after checking that every column the job names is in the file."""
    image = image_column(schema, uri, columns.image)
    named = {"--id-column": [columns.id] if columns.id else [], "--keep-columns": list(columns.keep),
             "--label-column": [columns.label] if columns.label else []}
    for flag, names in named.items():
        missing = [name for name in names if name not in schema.names]
        if missing:
            raise SpecError(f"{flag} {', '.join(missing)}: not a column of {uri} (it has {', '.join(schema.names)})")
    if columns.id and pa.types.is_nested(schema.field(columns.id).type):
        raise SpecError(f"--id-column {columns.id!r} of {uri} is {schema.field(columns.id).type}: "
                        "keys come from a string or integer column")
    return image


def row_group_items(item: Item, group_rows: list[int]) -> list[Item]:
    """One manifest item per non-empty row group (or record batch) of the file, with its first row and row count."""
    out, first = [], 0
    for index, rows in enumerate(group_rows):
        if rows:
            out.append(Item(item.key, item.uri, item.size, item.etag, row_group=index, first_row=first, rows=rows))
        first += rows
    return out


def shard_runs(groups: list[Item], shard_size: int) -> Iterator[list[Item]]:
    """Consecutive row groups up to `shard_size` rows per shard (a larger row group is a shard of its own):
    a row group is never split, since its image column chunk is read whole."""
    run: list[Item] = []
    rows = 0
    for group in groups:
        if run and rows + group.rows > shard_size:
            yield run
            run, rows = [], 0
        run.append(group)
        rows += group.rows
    if run:
        yield run
