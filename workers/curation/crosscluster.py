"""Near-duplicates that k-means put in different clusters, and the kept rule over them (numpy +
faiss + scipy; no I/O, no queue).

SemDeDup compares rows only inside a cluster, so two near-duplicates on either side of a
boundary both survive. Here every row also visits its few nearest other clusters (`probes`),
but only those that could hold a row at or above 1 - eps: for unit rows x, y with cos(x, y) >=
1 - eps, |x - y| <= sqrt(2 eps), and a cosine with any centroid moves by at most that much, so
y's cluster Y (nearer to y than x's own X) has cos(x, cY) >= cos(x, cX) - 2 sqrt(2 eps).

A near-duplicate pair across a boundary is near it from both sides: when x (in X) visits Y, its
partner y counts X among its own nearest clusters too, almost always within a few more. So a row
is sent to its `probes` nearest other clusters, and there meets only the rows that count its
cluster among their BACK_CLUSTERS nearest (a small product per pair of clusters, not a
cluster's rows against every visitor). A pair is missed only when neither row sends itself to the
other's cluster, or the receiving row ranks the sender's cluster lower; every probe raises recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.curation import semdedup

BACK_CLUSTERS = 16  # a row meets visitors from its this many nearest other clusters (ids only: cheap to keep)


def back_clusters(probes: int) -> int:
    """How many near other clusters a row keeps the ids of: none when rows visit none."""
    return max(probes, BACK_CLUSTERS) if probes else 0


def visits(unit: np.ndarray, centroids: np.ndarray, probes: int, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(home cluster, its cosine, near other clusters [rows, back_clusters(probes)], nearest first, -1
    where none) of every unit row: it visits the first `probes`, and meets visitors from all of them."""
    nearest, cosine = semdedup.nearest_centroids(unit, centroids, 1 + back_clusters(probes))
    others = nearest[:, 1:].copy()
    reach = cosine[:, :1] - 2 * math.sqrt(2 * eps)  # no near-duplicate of the row is in a farther cluster
    others[cosine[:, 1:] < reach] = -1
    return nearest[:, 0], cosine[:, 0], others


@dataclass(frozen=True)
class CrossPairs:
    """Pairs at or above the threshold across clusters: (visitor, resident) indices and their cosine."""

    pairs: np.ndarray
    cosine: np.ndarray


def by_value(values: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of a [rows, k] array of cluster ids, per id (-1 left out)."""
    rows, _ = np.nonzero(values >= 0)
    ids = values[values >= 0]
    order = np.argsort(ids, kind="stable")
    split = np.flatnonzero(np.diff(ids[order])) + 1
    return {int(ids[order[g[0]]]): rows[order[g]] for g in np.split(np.arange(len(order)), split) if len(g)}


def cross_pairs(resident: np.ndarray, resident_visits: np.ndarray, visitor: np.ndarray, visitor_home: np.ndarray,
                eps: float) -> CrossPairs:
    """The pairs at or above 1 - eps between one cluster's visitors (unit rows from other clusters,
    `visitor_home`) and its own rows that visit those clusters back (`resident_visits`: [rows, probes])."""
    threshold = np.float32(1.0 - eps)
    back = by_value(resident_visits)
    pairs, cosines = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    for home, theirs in by_value(visitor_home[:, None]).items():
        mine = back.get(home)
        if mine is None:
            continue
        sims = visitor[theirs] @ resident[mine].T
        a, b = np.nonzero(sims >= threshold)
        if len(a):  # most pairs of clusters hold none: skip the bookkeeping
            pairs.append(np.stack([theirs[a], mine[b]], axis=1).astype(np.int64))
            cosines.append(sims[a, b].astype(np.float32))
    return CrossPairs(np.concatenate(pairs), np.concatenate(cosines))


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
