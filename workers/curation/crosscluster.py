"""Near-duplicates that k-means put in different clusters, and the kept rule over them (numpy +
faiss + scipy; no I/O, no queue).

SemDeDup compares rows only inside a cluster, so two near-duplicates on either side of a
boundary both survive. Here a row also visits a few near other clusters and meets, there, the
rows that count its own cluster among theirs (`plan_visits`). What "near" means is a margin: a
row's home cosine minus its cosine with the other centroid. For unit rows x (in X), y (in Y)
with cos(x, y) >= 1 - eps, |x - y| <= sqrt(2 eps), so no row has a near-duplicate in a cluster
farther than 2 sqrt(2 eps) (the reach), and m(x, Y) + m(y, X) = <x - y, cX - cY>: the two
margins of a pair add up to little when its difference is not aligned with the centroids'.
A row visits its `probes` nearest and those within VISIT_MARGIN sqrt(2 eps), and meets visitors
from its `probes` nearest and those within BACK_MARGIN sqrt(2 eps); a pair whose margins add up
to at most BACK_MARGIN sqrt(2 eps) is met from its smaller side, and with `probes` as large as the
clusters every pair is.

Every pair found is a true pair above the threshold across clusters, whichever rows were
compared to find it, so the products are batched freely (`cross_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.curation import semdedup

BACK_CLUSTERS = 12  # a row meets visitors from at most this many of its nearest other clusters (bench/RESULTS.md)
VISIT_MARGIN = 0.125  # also visit a cluster this near, in units of sqrt(2 eps) (see `plan_visits`)
BACK_MARGIN = 2 * VISIT_MARGIN  # meet visitors from a cluster this near, beyond the `probes` nearest


def back_clusters(probes: int) -> int:
    """How many near other clusters a row keeps the ids of: none when rows visit none."""
    return max(probes, BACK_CLUSTERS) if probes else 0


@dataclass(frozen=True)
class Visits:
    """Per unit row: its home cluster and cosine, its near other clusters ([rows, back_clusters(probes)],
    nearest first, -1 where it meets no visitor from them) and which of them it visits (`visit`)."""

    home: np.ndarray
    cosine: np.ndarray
    others: np.ndarray
    visit: np.ndarray


def plan_visits(unit: np.ndarray, centroids: np.ndarray, probes: int, eps: float) -> Visits:
    """Which near other clusters each row visits and meets visitors from, by its margin there (the
    home cosine minus the cosine with that centroid).

    For a pair x (in X), y (in Y) at or above 1 - eps, m(x, Y) + m(y, X) = <x - y, cX - cY>, at most
    sqrt(2 eps) |cX - cY|; for a near-duplicate whose difference is not aligned with the centroids'
    (noise, a re-encoding) it is a small share of that. So a row visits its `probes` nearest and
    every cluster within VISIT_MARGIN sqrt(2 eps), and meets visitors from its `probes` nearest and
    every cluster within BACK_MARGIN sqrt(2 eps): a pair whose margins add up to at most
    BACK_MARGIN sqrt(2 eps) is always met from its smaller side (bench/RESULTS.md: the largest sum
    among 11,568 planted pairs across clusters at 1,000,000 vectors was 0.21 sqrt(2 eps))."""
    back = back_clusters(probes)
    nearest, cosine = semdedup.nearest_centroids(unit, centroids, 1 + back)
    others = nearest[:, 1:].copy()
    margin = cosine[:, :1] - cosine[:, 1:]
    step = math.sqrt(2 * eps)
    first = np.arange(back)[None, :] < probes
    others[(margin > 2 * step) | (~first & (margin > BACK_MARGIN * step))] = -1  # no near-duplicate farther out
    visit = (others >= 0) & (first | (margin <= VISIT_MARGIN * step))
    return Visits(nearest[:, 0], cosine[:, 0], others, visit)


def visits(unit: np.ndarray, centroids: np.ndarray, probes: int, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(home cluster, its cosine, near other clusters) of every unit row (see `plan_visits`)."""
    found = plan_visits(unit, centroids, probes, eps)
    return found.home, found.cosine, found.others


@dataclass(frozen=True)
class CrossPairs:
    """Pairs at or above the threshold across clusters: (visitor, resident) indices and their cosine."""

    pairs: np.ndarray
    cosine: np.ndarray


def cross_pairs(resident: np.ndarray, resident_visits: np.ndarray, visitor: np.ndarray, visitor_home: np.ndarray,
                eps: float) -> CrossPairs:
    """The pairs at or above 1 - eps between one cluster's visitors (unit rows from other clusters,
    `visitor_home`) and its own rows that meet visitors from those clusters (`resident_visits`:
    [rows, k] cluster ids, -1 for none).

    A cluster has hundreds of home clusters among its visitors, with a few visitors and residents
    each: one product per home would cost a Python call per few hundred sums. So the blocks are
    padded to a few sizes (`padded`) and computed as one batched product per block shape."""
    rows, slots = np.nonzero(resident_visits >= 0)
    back = resident_visits[rows, slots]
    by_back = np.argsort(back, kind="stable")
    back, rows = back[by_back], rows[by_back]
    by_home = np.argsort(visitor_home, kind="stable")
    homes, starts, counts = np.unique(visitor_home[by_home], return_index=True, return_counts=True)
    low, high = np.searchsorted(back, homes, "left"), np.searchsorted(back, homes, "right")
    met = np.flatnonzero(high > low)
    blocks = Blocks(starts[met], counts[met], low[met], high[met] - low[met])
    pairs, cosines = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    width, height = padded(blocks.visitors), padded(blocks.residents)
    shape = width * (1 << 32) + height  # one int per block shape: a 1-d sort
    by_shape = np.argsort(shape, kind="stable")
    firsts = np.flatnonzero(np.diff(shape[by_shape], prepend=-1))
    for first, stop in zip(firsts.tolist(), np.append(firsts[1:], len(shape)).tolist()):
        chosen = by_shape[first:stop]
        size = (int(width[chosen[0]]), int(height[chosen[0]]))
        found, sims = blocks.products(chosen, size, visitor, by_home, resident, rows, np.float32(1.0 - eps))
        pairs.append(found)
        cosines.append(sims)
    return CrossPairs(np.concatenate(pairs), np.concatenate(cosines))


@dataclass(frozen=True)
class Blocks:
    """The (home cluster, resident cluster) blocks of one cluster's visitors: each a run of the
    visitors sorted by home (`start`, `visitors`) and a run of its residents' ids sorted by the
    home they meet (`low`, `residents`)."""

    start: np.ndarray
    visitors: np.ndarray
    low: np.ndarray
    residents: np.ndarray

    def products(self, chosen: np.ndarray, shape: tuple[int, int], visitor: np.ndarray, by_home: np.ndarray,
                 resident: np.ndarray, rows: np.ndarray, threshold: np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(visitor, resident) rows of every pair at or above `threshold` in the `chosen` blocks, all of
        this padded `shape` (`by_home`: the visitors sorted by home), and their cosines: one batched product."""
        width, height = shape
        v_real = np.arange(width)[None, :] < self.visitors[chosen, None]
        r_real = np.arange(height)[None, :] < self.residents[chosen, None]
        v_at = by_home[np.where(v_real, self.start[chosen, None] + np.arange(width), 0)]
        r_at = rows[np.where(r_real, self.low[chosen, None] + np.arange(height), 0)]
        sims = np.matmul(visitor[v_at], resident[r_at].transpose(0, 2, 1))  # [blocks, width, height]
        above = sims >= threshold
        if not above.any():  # most shapes of most clusters hold no pair
            return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        block, i, j = np.nonzero(above)
        real = v_real[block, i] & r_real[block, j]  # padding repeats a real row: drop its pairs
        block, i, j = block[real], i[real], j[real]
        return np.stack([v_at[block, i], r_at[block, j]], axis=1).astype(np.int64), sims[block, i, j]


def padded(counts: np.ndarray) -> np.ndarray:
    """Each count (>= 1) rounded up to the next 2^k or 1.5 * 2^k: few shapes, at most a third padding."""
    counts = np.maximum(counts, 1).astype(np.int64)
    power = 1 << np.floor(np.log2(counts)).astype(np.int64)
    return np.where(counts <= power, power, np.where(counts <= power + power // 2, power + power // 2, 2 * power))


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
