"""Tables whose rows are images, whatever file holds them: a parquet file (row groups, from its footer) or an
Arrow IPC stream that `datasets` save_to_disk wrote (record batches, from their headers). Planning, the
workers' row groups and the labeled readers ask a `Footer` for a table's schema and groups and read one
group at a time through it; nothing else knows which kind of file it is. Planning a job's tables
(`plan_parquet`: their row groups and kept columns) is here too, above parquetinputs.py, which reads
one parquet file's footer and columns and imports nothing back.

A save_to_disk folder holds `state.json` (its `_data_files`: the streams, in order) and
`dataset_info.json` (its `features`: which column is an Image, a ClassLabel's names); those features
are the table's, else the stream schema's own `huggingface` metadata.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import ObjectNotFound, ObjectUnreadable, SpecError, StorageError
from orchestrator.inputs.arrowstreams import StreamIndex, read_batch, read_stream_index
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.parquetinputs import (
    HF_METADATA_KEY,
    ParquetColumns,
    RangedFile,
    ReadStats,
    check_columns,
    is_image_type,
    nested_image_columns,
    read_footer,
    refuse_nested,
    row_group_items,
)
from orchestrator.store.scope import outside_input
from orchestrator.store.storage import ObjectStore

ARROW_SUFFIX = ".arrow"
DATASET_INFO = "dataset_info.json"  # save_to_disk's features
DATASET_STATE = "state.json"  # save_to_disk's list of stream files


def is_arrow_key(key: str) -> bool:
    return key.lower().endswith(ARROW_SUFFIX)


@dataclass(frozen=True)
class Footer:
    """What a table file says before any image is read: its schema (with `datasets` features) and its groups."""

    uri: str
    size: int
    schema: pa.Schema
    parquet: pq.FileMetaData | None = None
    stream: StreamIndex | None = None

    def group_rows(self) -> list[int]:
        if self.parquet is not None:
            return [self.parquet.row_group(i).num_rows for i in range(self.parquet.num_row_groups)]
        assert self.stream is not None  # a footer is one or the other (read_table_footer)
        return [batch.rows for batch in self.stream.batches]

    def image_bytes(self, index: int, column: str) -> int:
        """Bytes of the image column in group `index` (parquet: its chunks uncompressed; Arrow: the whole batch)."""
        if self.parquet is None:
            assert self.stream is not None
            return self.stream.batches[index].size
        group = self.parquet.row_group(index)
        chunks = (group.column(i) for i in range(group.num_columns))
        return sum(c.total_uncompressed_size for c in chunks if c.path_in_schema.split(".")[0] == column)

    def group_bytes(self, index: int) -> int:
        if self.parquet is not None:
            return self.parquet.row_group(index).total_byte_size
        assert self.stream is not None
        return self.stream.batches[index].size

    def read_group(self, store: ObjectStore, index: int, columns: list[str], within: str | None = None,
                   stats: ReadStats | None = None) -> pa.Table:
        """These columns of group `index`: parquet reads their chunks only, Arrow the batch's one message."""
        if self.parquet is not None:
            source = RangedFile(store, self.uri, self.size, within, stats)
            return pq.ParquetFile(source, metadata=self.parquet).read_row_group(index, columns=columns)
        assert self.stream is not None
        batch = read_batch(store, self.uri, self.stream, index, within, stats)
        return pa.Table.from_batches([batch]).select(columns)

    def read_column(self, store: ObjectStore, column: str, within: str | None = None) -> list:
        """One column's values, every group in order (labels at submit)."""
        return [value for index in range(len(self.group_rows()))
                for value in self.read_group(store, index, [column], within).column(column).to_pylist()]


def read_table_footer(store: ObjectStore, uri: str, size: int = -1, within: str | None = None,
                      stats: ReadStats | None = None) -> Footer:
    """The footer of a .parquet file or a save_to_disk .arrow stream; ValueError when it is neither."""
    size = store.info(uri).size if size < 0 else size
    if not is_arrow_key(uri):
        metadata = read_footer(store, uri, size, within, stats)
        return Footer(uri, size, metadata.schema.to_arrow_schema(), parquet=metadata)
    try:
        stream = read_stream_index(store, uri, size, within, stats)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})") from e
    features = _dataset_info_features(store, uri, within)
    schema = stream.schema
    if features is not None:
        schema = schema.with_metadata({**(schema.metadata or {}),
                                       HF_METADATA_KEY: json.dumps({"info": {"features": features}}).encode()})
    return Footer(uri, size, schema, stream=stream)


def _dataset_info_features(store: ObjectStore, uri: str, within: str | None) -> dict | None:
    """The `features` of the dataset_info.json beside a stream (save_to_disk), or None without one."""
    info_uri = posixpath.dirname(uri) + "/" + DATASET_INFO
    if within is not None and outside_input(info_uri, within) is not None:
        return None
    try:
        features = json.loads(store.read(info_uri, max_bytes=16 << 20, within=within)).get("features")
    except (ObjectNotFound, ObjectUnreadable, StorageError, ValueError, AttributeError):
        return None
    return features if isinstance(features, dict) else None


def streams_in_state(files: list[Item], store: ObjectStore) -> tuple[list[Item], list[str]]:
    """The table files to read, and the keys left out: an .arrow file in a save_to_disk folder whose state.json
    does not list it. SpecError when a state.json is unreadable or lists a file that is not there."""
    listed: dict[str, set[str] | None] = {}
    out: list[Item] = []
    ignored: list[str] = []
    for item in files:
        folder = posixpath.dirname(item.uri)
        if is_arrow_key(item.uri) and folder not in listed:
            listed[folder] = _present_streams(store, folder)
        names = listed.get(folder)
        if is_arrow_key(item.uri) and names is not None and item.uri not in names:
            ignored.append(item.key)
        else:
            out.append(item)
    return out, ignored


def _present_streams(store: ObjectStore, folder: str) -> set[str] | None:
    """The uris of the streams a folder's state.json lists, each checked to be there; None without state.json."""
    try:
        names = listed_streams(store, folder)
    except ValueError as e:
        raise SpecError(f"{e}; fix it or pass the .arrow files themselves") from e
    if names is None:
        return None
    uris = {folder + "/" + (quote(name) if folder.startswith("file://") else name) for name in names}
    missing = sorted(uri for uri in uris if not store.exists(uri))
    if missing:
        raise SpecError(f"{folder}/{DATASET_STATE} lists {missing[0]}, which is not there"
                        f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}: save the dataset again")
    return uris


def listed_streams(store: ObjectStore, folder: str) -> list[str] | None:
    """The stream files a save_to_disk folder's state.json lists, in order; None when it has none."""
    try:
        state = json.loads(store.read(folder.rstrip("/") + "/" + DATASET_STATE, max_bytes=16 << 20))
    except (ObjectNotFound, ObjectUnreadable, StorageError):
        return None
    except ValueError as e:
        raise ValueError(f"{folder}/{DATASET_STATE} is not JSON ({e})") from e
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise ValueError(f"{folder}/{DATASET_STATE} lists no _data_files: is this a datasets save_to_disk folder?")
    return [f["filename"] for f in files]


@dataclass
class ParquetPlan:
    """Every row group of a job's parquet files, and the types its kept columns are written with."""

    row_groups: list[Item] = field(default_factory=list)
    kept_columns: pa.Schema | None = None
    ignored: list[str] = field(default_factory=list)  # files without an image column (img2dataset's sidecars)


def plan_parquet(files: list[Item], store: ObjectStore, columns: ParquetColumns, scope: str,
                 stats: ReadStats | None = None) -> ParquetPlan:
    """The row groups of every table file (parquet, save_to_disk's Arrow streams), in file then row-group
    order; SpecError on an unreadable footer. Planning reads each table's `Footer` only."""
    if columns.image_root is not None:
        check_image_root(columns.image_root, store)
    groups: list[Item] = []
    kept: list[pa.Schema] = []
    files, ignored = streams_in_state(files, store)
    for item in files:
        try:
            footer = read_table_footer(store, item.uri, item.size, within=scope, stats=stats)
        except ValueError as e:
            raise SpecError(f"{item.uri}: {e}; fix or remove the file (or list the others in a manifest)") from e
        except (ObjectNotFound, ObjectUnreadable) as e:
            raise SpecError(f"{item.uri}: the footer cannot be read ({e})") from e
        schema = footer.schema
        if columns.image is None and not any(is_image_type(schema.field(n).type) for n in schema.names):
            refuse_nested(schema, item.uri, nested_image_columns(schema))
            ignored.append(item.key)  # a table without images: img2dataset's sidecar of a .tar, say
            continue
        check_columns(schema, item.uri, columns)
        kept.append(pa.schema([schema.field(name) for name in columns.keep]))
        groups += row_group_items(Item(item.key, item.uri, footer.size, item.etag), footer.group_rows())
    return ParquetPlan(groups, _unified(kept, files) if columns.keep and kept else None, ignored)


def check_image_root(root: str, store: ObjectStore) -> None:
    """--image-root names a folder that holds objects, and not the whole file system; SpecError otherwise."""
    if root.rstrip("/") == "file:":  # file:/// is the whole file system
        raise SpecError("--image-root / would let path cells name any file: pass the folder that holds the images")
    try:
        first = next(iter(store.list(root)), None)
    except (ObjectNotFound, StorageError) as e:
        raise SpecError(f"--image-root {root} cannot be listed ({e}): pass the folder that holds the images") from e
    if first is None:
        raise SpecError(f"--image-root {root} holds no objects: pass the folder that holds the images")


def _unified(schemas: list[pa.Schema], files: list[Item]) -> pa.Schema:
    """One type per kept column across files (int32 and int64 become int64); SpecError when they clash."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SpecError(f"--keep-columns: the files give a column different types ({e}); keep columns whose "
                        f"types agree across {files[0].uri} and the other files") from e
