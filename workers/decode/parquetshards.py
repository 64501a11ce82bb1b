"""Parquet row groups -> rows: items keyed `<file key>/<row index>` (or by --id-column), and their
image cells read one row group at a time.

A shard's manifest names whole row groups (orchestrator/inputs/parquetinputs.py). Expanding them
reads the footer once per file and the small columns (id, pass-through, label) of each row
group; the image column is read later, by `RowGroupCells`, when the pipeline asks for the
group's first cell, and dropped once its last cell has been handed over. With the pipeline's
bounded read-ahead, a worker holds one row group's images (two at a boundary), never the file.

A cell is an image's bytes, or a `path` (bytes null: a `datasets` Image saved by reference):
relative to the parquet object's folder, or absolute (what `datasets` writes for an Image cast from
file paths), read inside the job's input or its --image-root only. A null cell, a path outside
both, a cell over the byte cap or a row group that cannot be read becomes an
error row with the reason; the decoder turns undecodable bytes into error rows as for files.
"""

from __future__ import annotations

import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    ObjectUnreadable,
    OutsideInput,
    SpecError,
)
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.parquetinputs import ParquetColumns, ReadStats, check_columns, class_names
from orchestrator.inputs.tablefiles import Footer, read_table_footer
from orchestrator.store.scope import outside_input, path_cell_uri
from orchestrator.store.storage import ObjectStore

IMG2DATASET_ERROR = "error_message"  # img2dataset's reason for a null `jpg`


@dataclass
class Passthrough:
    """Input columns copied into a shard's output rows: the fields, and one dict per item (manifest order)."""

    fields: list[pa.Field]
    rows: list[dict]

    def merge(self, rows: list[dict], schema: pa.Schema) -> tuple[list[dict], pa.Schema]:
        """Output rows (one per item, in order) with the kept columns; a name the output has gets `input_`."""
        taken = set(schema.names)
        renamed = [(f.name, f.with_name(f"input_{f.name}" if f.name in taken else f.name)) for f in self.fields]
        for _, out_field in renamed:
            schema = schema.append(out_field)
        if len(self.rows) != len(rows):  # a shard without parquet rows: the columns are there, null
            self.rows = [{}] * len(rows)
        merged = [{**row, **{out.name: kept.get(name) for name, out in renamed}}
                  for row, kept in zip(rows, self.rows, strict=True)]
        return merged, schema


@dataclass
class RowGroup:
    """One row group of a shard and, while its cells are being read, its image column."""

    item: Item
    footer: Footer  # the file's: parquet row groups or the record batches of an Arrow stream
    image: str
    remaining: int
    column: pa.Array | None = None
    errors: pa.Array | None = None
    failure: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Expanded:
    """What a parquet shard's manifest becomes on the worker."""

    items: list[Item]
    cells: RowGroupCells
    passthrough: Passthrough | None
    labels: list[object | None]  # the --label-column value of each row (None: no label column)
    label_names: list[str] | None  # a ClassLabel column's names, from the huggingface metadata


class RowGroupCells:
    """uri -> an image's bytes, or why there are none: the pipeline's `blobs` for a parquet shard."""

    def __init__(self, store: ObjectStore, max_bytes: int, max_group_bytes: int, scope: str | None,
                 stats: ReadStats | None = None, image_root: str | None = None) -> None:
        self.store, self.max_bytes, self.max_group_bytes, self.scope = store, max_bytes, max_group_bytes, scope
        self.image_root = image_root  # --image-root: where absolute path cells may point besides the input
        self.stats = stats
        self.reasons: dict[str, str] = {}  # rows known bad before any image is read
        self.owner: dict[str, tuple[RowGroup, int]] = {}
        self.peak_groups = 0  # most row groups held at once (tests and benches)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        # Row groups are read on one thread: glibc gives each reader thread its own arena, and a large
        # column chunk freed in one arena is not reused by the next thread's read, so reads spread over
        # 16 reader threads kept up to one freed row group per thread.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="vitbatch-rowgroup")

    def __bool__(self) -> bool:
        return bool(self.reasons or self.owner)

    def __contains__(self, uri: str) -> bool:
        return uri in self.reasons or uri in self.owner

    def pop(self, uri: str) -> bytes | str:
        if uri in self.reasons:
            return self.reasons.pop(uri)
        group, offset = self.owner.pop(uri)
        try:
            return self.cell(group, offset)
        finally:
            self._done(group)

    def cell(self, group: RowGroup, offset: int) -> bytes | str:
        """The group's cell at `offset` (its image column is read on first use), or why there is no image."""
        with group.lock:
            if group.column is None and group.failure is None:
                # read once; a row group that cannot be read is not retried
                group.failure = self._loader.submit(self._load, group).result()
        if group.failure is not None:
            return group.failure
        column = group.column
        assert column is not None  # read, or the failure above says why not
        if not column[offset].is_valid:
            return self._null_reason(group, offset)
        if pa.types.is_struct(column.type):
            return self._struct_cell(group, column, offset)
        return self._capped(column[offset].as_py())

    def _struct_cell(self, group: RowGroup, column: pa.StructArray, offset: int) -> bytes | str:
        names = [column.type.field(i).name for i in range(column.type.num_fields)]
        data = column.field("bytes")[offset].as_py() if "bytes" in names else None
        if data is not None:
            return self._capped(data)
        path = column.field("path")[offset].as_py() if "path" in names else None
        if not path:
            return self._null_reason(group, offset)
        return self._referenced(group.item.uri, path)

    def _capped(self, data: bytes) -> bytes | str:
        if len(data) > self.max_bytes:
            return str(ObjectTooLarge(f"image cell is {len(data)} bytes, over the cap of {self.max_bytes}"))
        return data

    def _referenced(self, table_uri: str, path: str) -> bytes | str:
        """A `path` cell: the object it names (relative to the table's folder, or absolute), read only inside
        the job's input or the --image-root it names."""
        try:
            uri = path_cell_uri(table_uri, path)
        except ValueError as e:
            return f"{e}: outside the job's input, not read"
        scope = self.scope or posixpath.dirname(table_uri)  # training data: the table's own folder
        root = next((r for r in (scope, self.image_root) if r and outside_input(uri, r) is None), None)
        if root is None:
            hint = ("pass --image-root with the folder that holds these images to read them" if self.scope else
                    "training reads path cells inside the table's own folder only")
            return (f"image path {path!r} is outside the job's input {scope}" +
                    (f" and --image-root {self.image_root}" if self.image_root else "") + f": not read ({hint})")
        try:
            return self.store.read(uri, max_bytes=self.max_bytes, within=root)
        except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable, OutsideInput) as e:
            return f"image path {path!r}: {e}"

    def _null_reason(self, group: RowGroup, offset: int) -> str:
        detail = group.errors[offset].as_py() if group.errors is not None else None
        return "image cell is null (no bytes, no path)" + (f": {detail}" if detail else "")

    def _load(self, group: RowGroup) -> str | None:
        """Read the group's image column (one ranged read per column chunk); the reason when it cannot be."""
        index, item = group.item.row_group, group.item
        chunk_bytes = group.footer.image_bytes(index, group.image)
        if chunk_bytes > self.max_group_bytes:
            return (f"row group {index} of {item.uri} holds {chunk_bytes} bytes of images, over the cap of "
                    f"{self.max_group_bytes} (VITBATCH_MAX_TAR_BYTES): write the file with smaller row groups")
        columns = [group.image] + ([IMG2DATASET_ERROR] if IMG2DATASET_ERROR in group.footer.schema.names else [])
        try:
            table = group.footer.read_group(self.store, index, columns, self.scope, self.stats)
        except (pa.ArrowException, OSError, ValueError) as e:
            return f"row group {index} of {item.uri} cannot be read ({type(e).__name__}: {e})"
        group.column = table.column(group.image).combine_chunks()
        if IMG2DATASET_ERROR in table.column_names:
            group.errors = table.column(IMG2DATASET_ERROR).combine_chunks()
        with self._lock:
            self._held.add(id(group))
            self.peak_groups = max(self.peak_groups, len(self._held))
        return None

    def _done(self, group: RowGroup) -> None:
        with group.lock:
            group.remaining -= 1
            if group.remaining == 0:
                group.column = group.errors = None  # the row group's images are freed here
                with self._lock:
                    self._held.discard(id(group))


def expand_row_groups(groups: list[Item], store: ObjectStore, columns: ParquetColumns, *, max_bytes: int,
                      max_group_bytes: int, scope: str | None, kept: pa.Schema | None = None,
                      stats: ReadStats | None = None) -> Expanded:
    """A parquet shard's row groups -> one item per row, the lazy image cells, kept columns and labels.

    `kept`: the kept columns' types as planned (every shard writes the same schema); unset = this shard's.
    """
    cells = RowGroupCells(store, max_bytes, max_group_bytes, scope, stats, columns.image_root)
    out = Expanded(items=[], cells=cells, passthrough=None, labels=[], label_names=None)
    footers: dict[str, tuple[Footer, str] | str] = {}
    kept_rows: list[dict] = []
    fields: dict[str, pa.Field] = {}
    seen: dict[str, int] = {}
    for group in groups:
        if group.uri not in footers:
            footers[group.uri] = _footer(store, group, columns, scope, stats)
        footer = footers[group.uri]
        small = footer if isinstance(footer, str) else _small_columns(store, group, footer[0], columns, scope, stats)
        if isinstance(small, str):  # every row of the group is an error row with the reason
            for offset in range(group.rows):
                item = _row_item(group, offset, None)
                out.items.append(item)
                cells.reasons[item.uri] = small
            kept_rows += [{}] * group.rows
            out.labels += [None] * group.rows
            continue
        assert not isinstance(footer, str)  # a footer that was not read is `small`'s reason above
        table_footer, image = footer
        fields.update({name: small.schema.field(name) for name in columns.keep if name not in fields})
        if columns.label and out.label_names is None:
            out.label_names = class_names(table_footer.schema, columns.label)
        row_group = RowGroup(group, table_footer, image, remaining=0)
        for offset in range(group.rows):
            item, reason = _keyed(group, offset, small, columns.id, seen)
            out.items.append(item)
            if reason is not None:
                cells.reasons[item.uri] = reason
            else:
                cells.owner[item.uri] = (row_group, offset)
                row_group.remaining += 1
        kept_rows += [{name: small.column(name)[i].as_py() for name in columns.keep} for i in range(group.rows)]
        out.labels += small.column(columns.label).to_pylist() if columns.label else [None] * group.rows
    if columns.keep:
        planned = list(kept) if kept is not None else [fields.get(n, pa.field(n, pa.null())) for n in columns.keep]
        out.passthrough = Passthrough(planned, kept_rows)
    return out


def _footer(store: ObjectStore, group: Item, columns: ParquetColumns, scope: str | None,
            stats: ReadStats | None) -> tuple[Footer, str] | str:
    """(footer, image column) of the group's file, or why its rows cannot be read (changed since planning)."""
    if scope is not None and (why := outside_input(group.uri, scope)) is not None:
        return why
    try:
        footer = read_table_footer(store, group.uri, group.size, within=scope, stats=stats)
        image = check_columns(footer.schema, group.uri, columns)
    except (ValueError, SpecError, ObjectNotFound, ObjectUnreadable, OutsideInput) as e:
        return f"parquet file not read: {e}"
    rows = footer.group_rows()
    if group.row_group >= len(rows) or rows[group.row_group] != group.rows:
        return f"parquet file not read: {group.uri} changed since the job was planned (row group {group.row_group})"
    return footer, image


def _small_columns(store: ObjectStore, group: Item, footer: Footer, columns: ParquetColumns,
                   scope: str | None, stats: ReadStats | None) -> pa.Table | str:
    """The id, kept and label columns of one row group (not the images), or why they cannot be read."""
    names = list(dict.fromkeys([n for n in (columns.id, *columns.keep, columns.label) if n]))
    if not names:
        return pa.table({"_": pa.nulls(group.rows)})
    try:
        return footer.read_group(store, group.row_group, names, scope, stats)
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"row group {group.row_group} of {group.uri} cannot be read ({type(e).__name__}: {e})"


def _row_item(group: Item, offset: int, key: str | None) -> Item:
    """Row `first_row + offset` of the file: keyed `<file key>/<row index>` unless an id names it."""
    row = group.first_row + offset
    return Item(key=key or f"{group.key}/{row}", uri=f"{group.uri}#{row}", etag=f"{group.etag}:{row}")


def _keyed(group: Item, offset: int, small: pa.Table, id_column: str | None,
           seen: dict[str, int]) -> tuple[Item, str | None]:
    """The row's item, and a reason when its id makes it an error row (null, or already seen in this shard)."""
    if id_column is None:
        return _row_item(group, offset, None), None
    value = small.column(id_column)[offset].as_py()
    if value is None or value == "":
        return _row_item(group, offset, None), f"--id-column {id_column!r} is empty in this row: no key"
    key = str(value)
    seen[key] = seen.get(key, 0) + 1
    if seen[key] > 1:
        return (_row_item(group, offset, f"{key}#{seen[key]}"),
                f"duplicate --id-column value {key!r}: an earlier row of this shard has it; not read")
    return _row_item(group, offset, key), None

