"""Images inside parquet files, save_to_disk Arrow streams and tars by address (`<object uri>#<row index>`,
`<tar uri>#<member>`), for finetune and evaluate, whose labeled items come from orchestrator/inputs/labeledsources.py.

Training reads items in a shuffled order, so the row groups and tars read last are kept, least
recently used first out, up to `CACHE_BYTES`: a training set that fits is read once per job; a
larger one rereads a row group (100 rows in `datasets` files) for a row whose group was evicted.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from orchestrator.config import Settings
from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable, SpecError
from orchestrator.inputs.labeledsources import split_address
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.parquetinputs import image_column, is_table_key
from orchestrator.inputs.tablefiles import Footer, read_table_footer
from orchestrator.store.storage import ObjectStore
from workers.decode.parquetshards import RowGroup, RowGroupCells
from workers.decode.tarshards import members

CACHE_BYTES = 1 << 30  # row groups and tars kept in memory while a job reads them


def addressed(uri: str) -> bool:
    """Whether `uri` names an image inside a parquet file or a tar."""
    return split_address(uri) is not None


class ContainerReader:
    """uri -> bytes or why not, for addressed images; thread-safe (training's data loader, evaluate's readers)."""

    def __init__(self, store: ObjectStore, settings: Settings, image_root: str | None = None) -> None:
        """`image_root`: where `path` cells may point besides the table's own folder (a spec's --image-root)."""
        self.store, self.settings = store, settings
        self.cells = RowGroupCells(store, settings.max_object_bytes, settings.max_tar_bytes, scope=None,
                                   image_root=image_root)
        self.files: dict[tuple[str, str | None], tuple[Footer, str, list[int]]] = {}
        self.cache: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.cached_bytes = 0
        self.lock = threading.Lock()

    # the pipeline's blobs protocol (evaluate): every addressed uri is "in" it
    def __contains__(self, uri: str) -> bool:
        return addressed(uri)

    def pop(self, uri: str) -> bytes | str:
        return self.read(uri)

    def read(self, uri: str) -> bytes | str:
        parts = split_address(uri)
        assert parts is not None  # only addressed uris are in these blobs (__contains__)
        base, address = parts
        try:
            if is_table_key(base):
                row, _, column = address.partition(":")
                return self._parquet_cell(base, int(row), column or None)
            return self._tar_member(base, uri)
        except (ObjectNotFound, ObjectUnreadable, ObjectTooLarge, SpecError, ValueError) as e:
            return f"{base} not read: {e}"

    def _parquet_cell(self, base: str, row: int, column: str | None) -> bytes | str:
        footer, image, starts = self._file(base, column)
        index = bisect.bisect_right(starts, row) - 1
        key = f"{base}#{image}#group{index}"
        with self.lock:
            group = self._cached(key)
            if group is None:
                rows = footer.group_rows()[index]
                item = Item(base, base, footer.size, row_group=index, first_row=starts[index], rows=rows)
                group = RowGroup(item, footer, image, remaining=-1)  # never freed by a count: evicted below
                self._remember(key, group, footer.group_bytes(index))
        return self.cells.cell(group, row - starts[index])

    def _file(self, base: str, column: str | None) -> tuple[Footer, str, list[int]]:
        with self.lock:
            if (base, column) not in self.files:
                footer = read_table_footer(self.store, base)
                image = image_column(footer.schema, base, column)
                starts, first = [], 0
                for rows in footer.group_rows():
                    starts.append(first)
                    first += rows
                self.files[base, column] = (footer, image, starts)
            return self.files[base, column]

    def _tar_member(self, base: str, uri: str) -> bytes | str:
        with self.lock:
            blobs = self._cached(base)
            if blobs is None:
                blobs = members(Item(base, base, tar=True), self.store, self.settings.max_tar_bytes,
                                self.settings.max_object_bytes)
                self._remember(base, blobs, sum(len(b) for b in blobs.values()))
        found = blobs.get(uri, blobs.get(base))  # the member, or why the whole tar was not read
        return found if found is not None else f"{uri}: no such image member in the tar"

    def _cached(self, key: str):
        if key not in self.cache:
            return None
        self.cache.move_to_end(key)
        return self.cache[key][0]

    def _remember(self, key: str, value, n_bytes: int) -> None:
        self.cache[key] = (value, n_bytes)
        self.cached_bytes += n_bytes
        while self.cached_bytes > CACHE_BYTES and len(self.cache) > 1:
            _, (old, old_bytes) = self.cache.popitem(last=False)
            self.cached_bytes -= old_bytes
            if isinstance(old, RowGroup):
                old.column = old.errors = None
