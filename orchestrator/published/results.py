"""Read a job's committed output back (pyarrow only; no torch).

Every reader reads exactly the parts one job's record lists (see outputs.py for the layout):
the latest succeeded job at the prefix by default, or the job named by `job_id`. Each part
is checked against its recorded sha256. The records first (`success_record`, the prefix's
holder, a listed part's bytes), then the tables and arrays built from them.

The package passes its store everywhere. The public readers (`success_record`, the job's record as
a JobRecord; `read_table`, `read_index`, `read_arrays`, `read_embeddings`, `read_kept_keys`,
`read_duplicate_pairs`) are also called from notebooks and scripts as `read_table(output)` (README
"Reading results"): for them alone `store` may be left out, and `open_store` builds one from the
environment's Settings.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import Settings
from orchestrator.constants import FAILURES_FILE, SUCCESS_FILE, VECTORS_DIR
from orchestrator.errors import CorruptOutput, ObjectNotFound, OutputNotFound
from orchestrator.jobspec.submitted import prefix_holder
from orchestrator.lifecycle.commits import JobRecord, RecordPart
from orchestrator.published.outputs import job_dir
from orchestrator.store.storage import ObjectStore, join, normalize_uri

__all__ = ["prefix_holder"]  # with every reader below: the records first, then tables and arrays

# -- records ---------------------------------------------------------------------------------


def read_json(store: ObjectStore, uri: str) -> dict | None:
    """The object as JSON, or None when it does not exist."""
    try:
        return json.loads(store.read(uri))
    except ObjectNotFound:
        return None


def read_record(store: ObjectStore, uri: str) -> JobRecord | None:
    """The job record (`_SUCCESS.json` or `_FAILURES.json`) at `uri`, typed; None when there is none."""
    data = read_json(store, uri)
    return None if data is None else JobRecord.from_json(data)


def success_record(output: str, store: ObjectStore | None = None, job_id: str | None = None) -> JobRecord:
    """The record readers follow: the latest succeeded job, or the job named (succeeded or not)."""
    store, output = open_store(store), normalize_uri(output)
    if job_id is None:
        record = read_record(store, join(output, SUCCESS_FILE))
        if record is None:
            failed = read_record(store, join(output, FAILURES_FILE))
            hint = (f"; job {failed.job_id} finished with failures: pass its id to read its committed parts"
                    if failed and failed.job_id else "")
            raise OutputNotFound(f"no succeeded job at {output}{hint}")
        if not record.job_id or not record.job_dir:  # written before jobs had folders and listed parts
            raise OutputNotFound(f"{output} was written by an older vitbatch (no job id or job folder in "
                                 f"{SUCCESS_FILE}): rerun the job with --overwrite")
        return record
    folder = job_dir(output, job_id)
    record = read_record(store, join(folder, SUCCESS_FILE)) or read_record(store, join(folder, FAILURES_FILE))
    if record is None:
        raise OutputNotFound(f"job {job_id} has no finished output at {output} (still running, or its files were "
                             "removed when a later job replaced it)")
    return record


def part_entries(record: JobRecord, suffix: str = "") -> list[RecordPart]:
    """The record's parts (in shard order) whose name ends with `suffix`."""
    return [part for part in record.parts if part.name.endswith(suffix)]


def read_part(output: str, part: RecordPart, store: ObjectStore) -> bytes:
    """A listed part's bytes, checked against the sha256 its job recorded."""
    data = store.read(join(output, part.name))
    if hashlib.sha256(data).hexdigest() != part.sha256:
        raise CorruptOutput(f"{join(output, part.name)} does not match the sha256 its job recorded: "
                            "it was changed after the job committed it; rerun the job")
    return data


# -- tables and arrays -----------------------------------------------------------------------

def open_store(store: ObjectStore | None = None) -> ObjectStore:
    """The public readers' edge: the store given, or one built from the environment's Settings
    for a caller outside the package (a notebook, a script) that passed none."""
    return store if store is not None else ObjectStore(Settings())


def committed_parts(output: str, store: ObjectStore, suffix: str = ".parquet", job_id: str | None = None) -> list[str]:
    """URIs of the parts the job's record lists, in shard order."""
    output = normalize_uri(output)
    return [join(output, part.name) for part in part_entries(success_record(output, store, job_id), suffix)]


def read_table(output: str, store: ObjectStore | None = None, limit_parts: int | None = None,
               job_id: str | None = None) -> pa.Table:
    """Every committed row of a classify job (or the index of an embed/attention job) as one Arrow table."""
    store, output = open_store(store), normalize_uri(output)  # a plain local path is fine too
    record = success_record(output, store, job_id)
    parts = record.row_parts()[:limit_parts]
    if not parts:
        raise OutputNotFound(f"job {record.job_id} at {output} committed no row parts ({record.kind} job)")
    return pa.concat_tables([pq.read_table(io.BytesIO(read_part(output, part, store))) for part in parts])


def read_index(output: str, store: ObjectStore | None = None, job_id: str | None = None) -> pa.Table:
    """The parquet index of an embed or attention job: key, etag, shard, row, error (+ overlay)."""
    return read_table(output, store, job_id=job_id)


def read_arrays(output: str, name: str, store: ObjectStore | None = None,
                job_id: str | None = None) -> tuple[list[str], np.ndarray]:
    """(keys, array) for one stored array (`cls`, `mean`, `patches`, `layer11`, `rollout`...).

    Rows follow the index in shard order; error rows have no array row and are left out.
    """
    store, output = open_store(store), normalize_uri(output)
    record = success_record(output, store, job_id)
    keys: list[str] = []
    arrays: list[np.ndarray] = []
    for index_part, array_part in array_parts(record, name):
        part_keys, array = read_array_part(output, index_part, array_part, store)
        if array is not None:  # None exactly when the shard had no good row (no keys)
            keys += part_keys
            arrays.append(array)
    if not arrays:
        raise OutputNotFound(f"no committed {name!r} arrays under {output}")
    return keys, np.concatenate(arrays)


def array_parts(record: JobRecord, name: str) -> list[tuple[RecordPart, RecordPart | None]]:
    """(index part, its `name` array part or None when the shard had no good row) per shard, in shard order."""
    listed = {part.name: part for part in record.parts}
    pairs = []
    for index_part in record.row_parts():
        folder, part = index_part.name.rsplit("/", 1)
        pairs.append((index_part, listed.get(f"{folder}/{name}/{part.replace('.parquet', '.npy')}")))
    return pairs


def read_array_part(output: str, index_part: RecordPart, array_part: RecordPart | None,
                    store: ObjectStore) -> tuple[list[str], np.ndarray | None]:
    """(keys, array rows) of one shard's good rows, both parts checked against their sha256."""
    good = [row for row in pq.read_table(io.BytesIO(read_part(output, index_part, store))).to_pylist()
            if row["error"] is None]
    if not good:
        return [], None
    name = index_part.name
    if array_part is None:
        raise OutputNotFound(f"{output}: the job stored no such array beside {name}: read an array its "
                             "embed job computed (its --pooling)")
    array = np.load(io.BytesIO(read_part(output, array_part, store)), allow_pickle=False)
    if len(array) != len(good):
        raise CorruptOutput(f"{name}: {len(array)} rows of {array_part.name} for {len(good)} index rows")
    return [row["key"] for row in sorted(good, key=lambda r: r["row"])], array


def read_embeddings(output: str, pooling: str = "cls", store: ObjectStore | None = None,
                    job_id: str | None = None, source: str = "npy") -> tuple[list[str], np.ndarray]:
    """(keys, float16 [N, hidden] or [N, tokens, hidden]) for a whole embed job, in one call.

    source="parquet": from the job's `vectors/` parquet parts (embed --parquet-vectors), in their dtype.
    """
    if source == "npy":
        return read_arrays(output, pooling, store, job_id)
    if source != "parquet":
        raise ValueError(f"source={source!r}: read 'npy' or 'parquet'")
    store, output = open_store(store), normalize_uri(output)
    record = success_record(output, store, job_id)
    parts = [p for p in part_entries(record, ".parquet") if p.name.split("/")[-2:-1] == [VECTORS_DIR]]
    if not parts:
        raise OutputNotFound(f"job {record.job_id} at {output} wrote no parquet vectors: run embed with "
                             "--parquet-vectors float16 (or float32), or read source='npy'")
    keys: list[str] = []
    arrays = []
    for part in parts:
        table = pq.read_table(io.BytesIO(read_part(output, part, store)))
        if table.num_rows == 0:
            continue
        if pooling not in table.column_names:
            raise OutputNotFound(f"{part.name} holds no {pooling!r} vectors (it has {table.column_names[1:]})")
        keys += table.column("key").to_pylist()
        arrays.append(vector_array(table.column(pooling)))
    if not arrays:
        raise OutputNotFound(f"no committed {pooling!r} vectors under {output}")
    return keys, np.concatenate(arrays)


def vector_table(output: str, pooling: str = "cls", store: ObjectStore | None = None,
                 job_id: str | None = None) -> pa.Table:
    """`key` and `vector` (fixed_size_list<float32>) for a whole embed job: what LanceDB's
    `create_table` and faiss take in one step (README "Vector search"); keys join the Delta index."""
    keys, vectors = read_embeddings(output, pooling, store, job_id)
    flat = vectors.reshape(len(vectors), -1).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.table({"key": keys, "vector": column})


def vector_array(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list column (nested for patches) as one numpy array [N, ...] of its dtype."""
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def read_kept_keys(output: str, store: ObjectStore | None = None, job_id: str | None = None) -> list[str]:
    """The keys a dedup job kept (one per near-duplicate group, and every unique image), in its row order."""
    table = read_table(output, store, job_id=job_id).select(["key", "kept"]).to_pydict()
    return [key for key, kept in zip(table["key"], table["kept"]) if kept]


def read_duplicate_pairs(output: str, store: ObjectStore | None = None,
                         job_id: str | None = None) -> list[tuple[str, str, float]]:
    """(removed key, the earlier key it duplicates, their cosine) for every row a dedup job removed."""
    table = read_table(output, store, job_id=job_id).select(["key", "duplicate_of", "cosine", "kept"]).to_pydict()
    return [(key, of, cosine) for key, of, cosine, kept in
            zip(table["key"], table["duplicate_of"], table["cosine"], table["kept"]) if not kept]
