"""Read a job's committed output back (pyarrow only; no torch)."""

from __future__ import annotations

import io
import json

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
