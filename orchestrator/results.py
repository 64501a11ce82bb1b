"""Read a job's committed output back (pyarrow only; no torch)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import COMMIT_DIR
from orchestrator.storage import ObjectStore, join


def committed_parts(output: str, store: ObjectStore, suffix: str = ".parquet") -> list[str]:
    """Part URIs named by commit markers, in shard order (uncommitted leftovers are ignored)."""
    markers = sorted(info.uri for info in store.list(join(output, COMMIT_DIR)))
    parts = []
    for uri in markers:
        marker = json.loads(store.read(uri))
        parts += [join(output, name) for name in sorted(marker["parts"]) if name.endswith(suffix)]
    return parts


def read_table(output: str, store: ObjectStore | None = None, limit_parts: int | None = None) -> pa.Table:
    """Every committed row of a classify job as one Arrow table (`.to_pandas()` for pandas)."""
    store = store or ObjectStore()
    parts = committed_parts(output, store)[:limit_parts]
    tables = [pq.read_table(io.BytesIO(store.read(uri))) for uri in parts]
    if not tables:
        raise FileNotFoundError(f"no committed parts under {output}")
    return pa.concat_tables(tables)


def read_index(output: str, store: ObjectStore | None = None) -> pa.Table:
    """The parquet index of an embed or attention job: key, etag, shard, row, error (+ overlay)."""
    return read_table(output, store)


def read_arrays(output: str, name: str, store: ObjectStore | None = None) -> tuple[list[str], np.ndarray]:
    """(keys, array) for one stored array (`cls`, `mean`, `patches`, `layer11`, `rollout`...).

    Rows follow the index in shard order; error rows have no array row and are left out.
    """
    store = store or ObjectStore()
    keys: list[str] = []
    arrays = []
    for uri in committed_parts(output, store):
        shard_index = pq.read_table(io.BytesIO(store.read(uri)))
        good = [row for row in shard_index.to_pylist() if row["error"] is None]
        part = uri.rsplit("/", 1)[1].replace(".parquet", ".npy")
        if good:
            array = np.load(io.BytesIO(store.read(join(output, name, part))), allow_pickle=False)
            if len(array) != len(good):
                raise ValueError(f"{part}: {len(array)} rows of {name} for {len(good)} index rows")
            keys += [row["key"] for row in sorted(good, key=lambda r: r["row"])]
            arrays.append(array)
    if not arrays:
        raise FileNotFoundError(f"no committed {name!r} arrays under {output}")
    return keys, np.concatenate(arrays)


def read_embeddings(output: str, pooling: str = "cls", store: ObjectStore | None = None) -> tuple[list[str], np.ndarray]:
    """(keys, float16 [N, hidden] or [N, tokens, hidden]) for a whole embed job, in one call."""
    return read_arrays(output, pooling, store)
