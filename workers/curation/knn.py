"""Nearest neighbours by cosine, the algorithm (numpy + faiss; no I/O, no queue).

Every input row is a unit row (semdedup.unit_rows), so cosine is the inner product.

    exact        faiss's flat inner-product search (BLAS matrix products and a heap per query)
                 over one block of indexed rows at a time, merged into a running top-k
    approximate  an IVF-Flat index (faiss.IndexIVFFlat, METRIC_INNER_PRODUCT): 4 x sqrt(rows)
                 inverted lists (faiss's guidance: 4 to 16 x sqrt) from k-means on a seeded sample
                 of 40 rows per list, every row stored as it is (float32),
                 so a cosine it returns is the exact cosine of that pair; only some pairs are missed.
                 nprobe (lists scanned per query) is the smallest power of two whose recall@k on
                 a seeded sample of queries reaches the target.

IVF-Flat over HNSW: on 2 cores HNSW's build took 7 times IVF's at 20,000 and at 100,000 384-d
rows (63 s against 9 s; `python -m bench.neighbors --hnsw`, bench/RESULTS.md) and is not
reproducible on several threads; IVF's build is k-means on a sample plus one assignment, and
its recall is tuned by one number after the build. The index holds every row in float32:
rows x dim x 4 bytes, read whole by every search task.

recall@k counts, per query, the returned neighbours whose cosine is at least the exact k-th
best's (less 1e-6: rows tied with the k-th are as good as it), out of k; averaged over queries.
"""

from __future__ import annotations

import math

import numpy as np

from workers.curation.semdedup import unit_rows

TIE = 1e-6
MIN_ROWS_PER_LIST = 39  # faiss warns when k-means has fewer training points per centroid
SAMPLE_PER_LIST = 40  # the index's k-means sample, per list (at most every row)
TRAIN_ITERATIONS = 10


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of every row, best first (ties: the lower id first)."""
    k = min(k, scores.shape[1])
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if scores.size else np.zeros((len(scores), 0), int)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def block_top_k(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, row indices) of the k best `rows` of every query, exact, best first."""
    import faiss

    k = min(k, len(rows))
    if not k:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    flat = faiss.IndexFlatIP(rows.shape[1])
    flat.add(np.ascontiguousarray(rows, dtype=np.float32))
    cosines, found = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return cosines, found


class RunningTopK:
    """The exact top-k of a fixed set of queries against indexed rows added block by block."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.cosines = np.zeros((len(queries), 0), np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        """The next block of unit indexed rows (their global ids follow the rows added before)."""
        cosines, found = block_top_k(self.queries, rows, self.k)
        self.cosines, self.ids = merge_top_k(np.concatenate([self.cosines, cosines], 1),
                                             np.concatenate([self.ids, found + self.seen], 1), self.k)
        self.seen += len(rows)


def exact_top_k(queries: np.ndarray, rows: np.ndarray, k: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, ids) of the exact top-k of every unit query among `rows` (any length: each
    block is made unit rows in float32 as it is searched)."""
    top = RunningTopK(queries, k)
    for start in range(0, len(rows), block):
        top.add(unit_rows(rows[start:start + block]))
    return top.cosines, top.ids


def lists_for(rows: int, per_sqrt: float = 4.0) -> int:
    """Inverted lists of the index: 4 x sqrt(rows), with at least 39 rows each (sqrt(rows) lists
    build faster but reach the same recall only at many times the nprobe: bench/RESULTS.md)."""
    return max(1, min(round(per_sqrt * math.sqrt(rows)), rows // MIN_ROWS_PER_LIST))


def sample_rows(total: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of `size` of the global rows [0, total), sorted (every row when size >= total)."""
    if size >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def train_index(sample: np.ndarray, lists: int, seed: int):
    """An empty, trained IVF-Flat inner-product index: k-means (seeded) on unit `sample` rows."""
    import faiss

    quantizer = faiss.IndexFlatIP(sample.shape[1])
    index = faiss.IndexIVFFlat(quantizer, sample.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = TRAIN_ITERATIONS
    index.cp.max_points_per_centroid = max(256, -(-len(sample) // lists))  # no second subsample
    index.cp.min_points_per_centroid = 1  # under 39 rows (one list) faiss would only warn
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def search_index(index, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, ids) of the index's top-k for unit queries, best first. A query whose scanned
    lists hold fewer than k rows is searched again over every list (so every row gets k)."""
    k = min(k, index.ntotal)
    index.nprobe = nprobe
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    cosines, ids = index.search(queries, k)
    short = np.flatnonzero((ids < 0).any(axis=1))
    if len(short):
        index.nprobe = index.nlist
        cosines[short], ids[short] = index.search(queries[short], k)
        index.nprobe = nprobe
    return cosines, ids


def recall_at_k(found_cosines: np.ndarray, exact_cosines: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k found (see the module docstring); 1.0 for no query."""
    k = min(k, exact_cosines.shape[1]) if exact_cosines.size else 0
    if not len(found_cosines) or not k:
        return 1.0
    kth = exact_cosines[:, k - 1:k] - TIE
    hits = np.minimum((found_cosines[:, :k] >= kth).sum(axis=1), k)
    return float(hits.mean() / k)


def tune_nprobe(index, queries: np.ndarray, exact_cosines: np.ndarray, k: int, target: float) -> tuple[int, float]:
    """(nprobe, its recall@k on `queries`): the smallest power of two reaching `target`, or every list."""
    nprobe = 1
    while True:
        nprobe = min(nprobe, index.nlist)
        recall = recall_at_k(search_index(index, queries, k, nprobe)[0], exact_cosines, k)
        if recall >= target or nprobe == index.nlist:
            return nprobe, recall
        nprobe *= 2


def index_bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
