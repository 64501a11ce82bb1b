"""Semantic deduplication, the algorithm (numpy + faiss; no I/O, no queue).

SemDeDup (Abbas et al., 2023), as NeMo Curator runs it: spherical k-means over unit vectors;
inside each cluster the rows are put in keep order (`hard`: farthest from the centroid first,
`easy`: nearest first, `random`: a seeded shuffle), and a row is a duplicate when its best
match among the rows *before* it is at least `1 - eps` in cosine. The first row of a
near-duplicate group is kept, so the kept set never holds two rows above the threshold.

The pairwise step is computed in row blocks (memory: block x cluster rows), never as the
full cluster x cluster matrix; a cluster above `max_rows` is split by a second k-means level
first (pairs across the split are not compared, as pairs across first-level clusters are not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEEP_ORDERS = ("hard", "easy", "random")
BLOCK_BYTES = 256 << 20  # one block of the similarity matrix (float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of length 1 (a zero row stays zero: it matches nothing)."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def fit_centroids(sample: np.ndarray, clusters: int, seed: int, iterations: int = 20) -> np.ndarray:
    """Spherical k-means centroids ([clusters, dim] float32, unit length) of unit `sample` rows."""
    import faiss

    clusters = max(1, min(clusters, len(sample)))
    kmeans = faiss.Kmeans(sample.shape[1], clusters, niter=iterations, seed=seed, spherical=True,
                          max_points_per_centroid=max(256, -(-len(sample) // clusters)),  # no second subsample
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    assert kmeans.centroids is not None  # set by train
    return unit_rows(kmeans.centroids)


def assign(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid per unit row as int32, its cosine as float32)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    cosine, nearest = index.search(np.ascontiguousarray(rows, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int32), cosine[:, 0].astype(np.float32)


def keep_order(keys: list[str], centroid_cosine: np.ndarray, keep: str, seed: int) -> np.ndarray:
    """Row order inside one cluster: earlier rows are kept over later near-duplicates; ties by key."""
    if keep not in KEEP_ORDERS:
        raise ValueError(f"keep must be one of {KEEP_ORDERS}, not {keep!r}")
    tiebreak = np.argsort(np.argsort(np.asarray(keys, dtype=object)))  # rank of each key
    if keep == "random":
        return np.random.default_rng(seed).permutation(len(keys))
    first = centroid_cosine if keep == "hard" else -centroid_cosine  # hard: least typical (farthest) first
    return np.lexsort((tiebreak, first))


@dataclass(frozen=True)
class EarlierMatches:
    """Per row (in keep order): its best cosine among the rows before it (-inf for the first) and
    that row's position (-1 for the first)."""

    cosine: np.ndarray
    position: np.ndarray


def earlier_matches(unit: np.ndarray) -> EarlierMatches:
    """Best earlier match of every row of one cluster, in row blocks (NeMo's triu(X Xᵀ).max(0))."""
    n = len(unit)
    best = np.full(n, -np.inf, dtype=np.float32)
    where = np.full(n, -1, dtype=np.int64)
    block = max(16, min(4096, BLOCK_BYTES // max(1, 4 * n)))
    for start in range(1, n, block):
        stop = min(n, start + block)
        sims = unit[start:stop] @ unit[:stop].T  # rows j in [start, stop) against every i < stop
        sims[np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]] = -np.inf  # only i < j counts
        where[start:stop] = sims.argmax(axis=1)
        best[start:stop] = sims[np.arange(stop - start), where[start:stop]]
    return EarlierMatches(best, where)


def split_large(unit: np.ndarray, max_rows: int, seed: int) -> list[np.ndarray]:
    """Row indices of pieces of at most about `max_rows` each (second-level k-means, recursively)."""
    if len(unit) <= max_rows:
        return [np.arange(len(unit))]
    pieces = -(-2 * len(unit) // max_rows)
    labels, _ = assign(unit, fit_centroids(unit, pieces, seed))
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    if len(groups) == 1:  # k-means could not split it (identical rows): compare them all, in blocks
        return [np.arange(len(unit))]
    out = []
    for group in groups:
        out += [group[sub] for sub in split_large(unit[group], max_rows, seed + 1)]
    return out


@dataclass(frozen=True)
class ClusterResult:
    """One cluster's rows in keep order: index into the cluster's input rows, kept, the
    best earlier match (input row index, -1 when none) and its cosine (NaN when none)."""

    order: np.ndarray
    kept: np.ndarray
    match: np.ndarray
    cosine: np.ndarray


def dedup_cluster(unit: np.ndarray, keys: list[str], centroid_cosine: np.ndarray, *, eps: float, keep: str,
                  seed: int, max_rows: int) -> ClusterResult:
    """Kept and duplicate rows of one cluster (unit rows); see the module docstring."""
    threshold = np.float32(1.0 - eps)
    orders, kept, match, cosine = [], [], [], []
    for piece in split_large(unit, max_rows, seed):
        order = piece[keep_order([keys[i] for i in piece], centroid_cosine[piece], keep, seed)]
        found = earlier_matches(unit[order])
        has = found.position >= 0
        orders.append(order)
        kept.append(~(found.cosine >= threshold))
        match.append(np.where(has, order[np.maximum(found.position, 0)], -1))
        cosine.append(np.where(has, found.cosine, np.nan).astype(np.float32))
    return ClusterResult(np.concatenate(orders), np.concatenate(kept), np.concatenate(match),
                         np.concatenate(cosine))


def nemo_reference(unit: np.ndarray, centroid_cosine: np.ndarray, eps: float, keep: str) -> np.ndarray:
    """NeMo Curator's semdedup step for one cluster, as it writes it (full matrix, torch ops in numpy):
    sort by distance to the centroid, M = triu(X Xᵀ, 1), duplicates where M.max(0) >= 1 - eps.
    Returns a kept mask over the input rows. For tests and bench/ only: memory is n x n."""
    distance = 1.0 - centroid_cosine
    order = np.argsort(-distance, kind="stable") if keep == "hard" else np.argsort(distance, kind="stable")
    x = unit[order]
    m = np.triu(x @ x.T, k=1)
    removed_sorted = m.max(axis=0) >= np.float32(1.0 - eps) if len(x) > 1 else np.zeros(len(x), bool)
    kept = np.ones(len(unit), dtype=bool)
    kept[order[removed_sorted]] = False
    return kept
