"""Embeddings as parquet beside the npy arrays (embed --parquet-vectors): `vectors/part-NNNNN.parquet` per shard,
the good rows' `key` and one `fixed_size_list<float16|float32>` column per stored array, in the index's row order.

`datasets`, pandas, duckdb and LanceDB read such a file as it is (a vector column per pooling), and it joins
back to the input on `key`. `patches` is a list of token vectors (`fixed_size_list<fixed_size_list<...>>`).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.constants import VECTORS_DIR, part_name

DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


def vector_column(values: np.ndarray, dtype: str) -> pa.Array:
    """[N, d] -> fixed_size_list<dtype>[d]; [N, t, d] -> fixed_size_list<fixed_size_list<dtype>[d]>[t]."""
    numpy_type, arrow_type = DTYPES[dtype]
    values = np.ascontiguousarray(values, dtype=numpy_type)
    column: pa.Array = pa.array(values.reshape(-1), type=arrow_type)
    for size in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def vectors_part(shard: int, keys: list[str], arrays: dict[str, np.ndarray], dtype: str,
                 metadata: dict[str, str]) -> dict[str, bytes]:
    """The shard's vectors file: name -> bytes (written with the shard's other parts)."""
    columns = {"key": pa.array(keys, pa.string())}
    columns.update({name: vector_column(values, dtype) for name, values in arrays.items()})
    table = pa.table(columns).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return {f"{VECTORS_DIR}/{part_name(shard, 'parquet')}": buffer.getvalue()}

