"""Near-duplicates that k-means put in different clusters, and the kept rule over them (numpy +
faiss + scipy; no I/O, no queue).

SemDeDup compares rows only inside a cluster, so two near-duplicates on either side of a
boundary both survive. Here every row also visits its few nearest other clusters (`probes`);
a cluster's rows and its visitors are compared there, which finds the pairs across clusters.
A row visits a cluster only when it could hold a row at or above 1 - eps: for unit rows x, y
with cos(x, y) >= 1 - eps, |x - y| <= sqrt(2 eps), and a cosine with any centroid moves by at
most that much, so y's cluster Y (nearer to y than x's own X) has cos(x, cY) >= cos(x, cX) -
2 sqrt(2 eps).

The resolution is the kept rule over the whole set: walk the rows in the job's keep order and
remove a row when a row kept before it is above the threshold. Only the connected groups of
the threshold graph that hold a pair across clusters can change; every other row keeps what
its cluster decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.curation import semdedup


def visits(unit: np.ndarray, centroids: np.ndarray, probes: int, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(home cluster, its cosine, visited clusters [rows, probes] with -1 where none) of every unit row."""
    nearest, cosine = semdedup.nearest_centroids(unit, centroids, 1 + probes)
    others = nearest[:, 1:].copy()
    reach = cosine[:, :1] - 2 * math.sqrt(2 * eps)  # no near-duplicate of the row is in a farther cluster
    others[cosine[:, 1:] < reach] = -1
    return nearest[:, 0], cosine[:, 0], others


@dataclass(frozen=True)
class CrossPairs:
    """Pairs of rows of different home clusters at or above the threshold: (a, b) indices into the
    rows given (a < b) and their cosine."""

    pairs: np.ndarray
    cosine: np.ndarray


def cross_pairs(unit: np.ndarray, home: np.ndarray, visitor: np.ndarray, eps: float) -> CrossPairs:
    """The pairs among one cluster's rows and its visitors (`visitor` marks them) whose home
    clusters differ, at or above 1 - eps (a faiss range search of the visitors against all)."""
    import faiss

    threshold = np.float32(1.0 - eps)
    queries = np.flatnonzero(visitor)
    if not len(queries):
        return CrossPairs(np.zeros((0, 2), np.int64), np.zeros(0, np.float32))
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(np.ascontiguousarray(unit, dtype=np.float32))
    radius = float(np.nextafter(threshold, np.float32(-1)))  # faiss keeps inner products > radius
    lims, cosine, found = index.range_search(np.ascontiguousarray(unit[queries], dtype=np.float32), radius)
    query = np.repeat(queries, np.diff(lims).astype(np.int64))
    keep = (cosine >= threshold) & (home[query] != home[found])
    a, b = np.minimum(query, found)[keep], np.maximum(query, found)[keep]
    pairs, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return CrossPairs(pairs.astype(np.int64).reshape(-1, 2), cosine[keep][first].astype(np.float32))


@dataclass(frozen=True)
class Resolution:
    """The kept rule over the whole set, for the rows whose group holds a pair across clusters
    (`rows`); for each: kept, its stand-in (row index, -1 when kept) and their cosine (NaN)."""

    rows: np.ndarray
    kept: np.ndarray
    stand_in: np.ndarray
    cosine: np.ndarray


def resolve(rank: np.ndarray, keys: list[str], pairs: np.ndarray, cosine: np.ndarray, across: np.ndarray) -> Resolution:
    """The job's keep order is (`rank`, key) over every row; `pairs` (a, b) are every pair at or above
    the threshold inside clusters and across them (`across` marks those), with their `cosine`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rank)
    pairs, first = np.unique(np.sort(pairs, axis=1), axis=0, return_index=True)  # one edge per pair
    cosine, across = cosine[first], across[first]
    if not across.any():
        return Resolution(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.float32))
    graph = coo_matrix((cosine, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    touched = np.isin(label, np.unique(label[pairs[across].ravel()]))
    rows = np.flatnonzero(touched)
    rows = np.array(sorted(rows.tolist(), key=lambda row: (rank[row], keys[row])), dtype=np.int64)
    both = (graph + graph.T).tocsr()
    kept = np.zeros(n, dtype=bool)
    stand_in = np.full(len(rows), -1, dtype=np.int64)
    best = np.full(len(rows), np.nan, dtype=np.float32)
    for at, row in enumerate(rows):  # in keep order: a kept neighbour was decided before this row
        start, stop = both.indptr[row], both.indptr[row + 1]
        neighbours, sims = both.indices[start:stop], both.data[start:stop]
        sims = np.where(kept[neighbours], sims, -np.inf)
        if len(sims) and sims.max() > -np.inf:
            stand_in[at], best[at] = neighbours[sims.argmax()], sims.max()
        else:
            kept[row] = True
    return Resolution(rows, kept[rows], stand_in, best)
