"""Near-duplicates that k-means put in different clusters, and the kept rule over them (numpy +
faiss + scipy; no I/O, no queue).

SemDeDup compares rows only inside a cluster, so two near-duplicates on either side of a
boundary both survive. Here a row also visits a few near other clusters and meets, there, the
rows that count its own cluster among theirs (`plan_visits`). What "near" means is a margin: a
row's home cosine minus its cosine with the other centroid. For unit rows x (in X), y (in Y)
with cos(x, y) >= 1 - eps, |x - y| <= sqrt(2 eps), and m(x, Y) + m(y, X) = <x - y, cX - cY>: the
two margins of a pair add up to little when its difference is not aligned with the centroids'.
A row visits the clusters within a limit (`margin` sqrt(2 eps); at most `probes` of them, nearest
first) and meets visitors from those within twice it (at most `back_clusters(probes)`); a pair whose
margins add up to at most twice the limit is met from its smaller side (`plan_visits` proves
it), and with the exact limit (`margin` None) and caps as large as the clusters every pair is.

The same pass closes the pieces of a cluster split over --max-cluster-size (`piece_pairs`):
the pieces are clusters of a second level, visited with the exact limit and no cap.

Every pair found is a true pair above the threshold across clusters, whichever rows were
compared to find it, so the products are batched freely (`cross_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.curation import semdedup

BACK_CLUSTERS = 12  # a row meets visitors from at most this many of its nearest other clusters (bench/RESULTS.md)
VISIT_MARGIN = 0.125  # visit a cluster this near, in units of sqrt(2 eps) (see `plan_visits`)
PIECE_PROBES = 64  # a row of a split cluster visits at most this many other pieces (`Visits.capped` past it)
SLACK = 1e-5  # fp32 rounding of the cosines the margins are computed from


def back_clusters(probes: int) -> int:
    """How many near other clusters a row keeps the ids of: none when rows visit none."""
    return max(probes, BACK_CLUSTERS) if probes else 0


@dataclass(frozen=True)
class Visits:
    """Per unit row: its home cluster and cosine, its near other clusters ([rows, back_clusters(probes)],
    nearest first, -1 where it meets no visitor from them), which of them it visits (`visit`), and
    whether a cap cut either list (`capped`: a cluster in the margin was left out, so the proof
    below does not cover that row)."""

    home: np.ndarray
    cosine: np.ndarray
    others: np.ndarray
    visit: np.ndarray
    capped: np.ndarray


def plan_visits(unit: np.ndarray, centroids: np.ndarray, probes: int, eps: float,
                margin: float | None = VISIT_MARGIN) -> Visits:
    """Which near other clusters each row visits and meets visitors from, by its margin there (the
    home cosine minus the cosine with that centroid): it visits those within a limit, at most
    `probes`, nearest first (a cap, not a count: most rows visit one or two), and meets visitors
    from those within twice the limit, at most `back_clusters(probes)`. The limit is `margin`
    sqrt(2 eps), or with `margin` None the bound sqrt(2 eps) |cX - cY| / 2 of each pair of clusters.

    Why no pair is missed whose margins add up to at most twice the limit (and no cap cut its rows'
    lists): take x (home X) and y (home Y), X != Y, cos(x, y) >= 1 - eps. Every row's home is its
    nearest centroid, so both margins m(x, Y) and m(y, X) are >= 0. Say m(x, Y) <= m(y, X) (the other
    case is the same with x and y swapped). If m(x, Y) + m(y, X) <= 2 L: 2 m(x, Y) <= 2 L, so x visits
    Y; and m(y, X) <= 2 L - m(x, Y) <= 2 L, so y counts X among the clusters it meets visitors from;
    `cross_pairs` at Y compares x with every resident that counts X: with y. With `margin` None
    every pair is met: the margins add up to m(x, Y) + m(y, X) = <x - y, cX - cY> <= |x - y| |cX - cY|
    (Cauchy-Schwarz) and |x - y|^2 = 2 - 2 cos(x, y) <= 2 eps, so they are at most 2 L for that L.
    The default VISIT_MARGIN is narrower: for a near-duplicate whose difference is not aligned with
    the centroids' (noise, a re-encoding) <x - y, cX - cY> is a small share of the bound
    (bench/RESULTS.md: the largest sum among 11,568 pairs across clusters at 1,000,000 vectors was
    0.21 sqrt(2 eps)); in 384-d random vectors the bound would visit almost every near cluster."""
    back = back_clusters(probes)
    nearest, cosine = semdedup.nearest_centroids(unit, centroids, 1 + back)
    others = nearest[:, 1:].copy()
    gap = cosine[:, :1] - cosine[:, 1:]
    step = math.sqrt(2 * eps)
    if margin is None:  # |cX - cY| of each row's home and each of its near others
        limit = step * centroid_distance(centroids, nearest[:, 0], others) / 2 + SLACK
    else:
        limit = np.full(gap.shape, margin * step + SLACK, np.float32)
    within = (others >= 0) & (gap <= 2 * limit)
    others[~within] = -1
    near = within & (gap <= limit)
    visit = near & (np.cumsum(near, axis=1) <= probes)
    capped = np.zeros(len(unit), bool)
    if 0 < back < len(centroids) - 1:  # the last slot within the limit: more clusters may be
        capped = within[:, -1].copy()
    capped |= near.sum(axis=1) > probes  # a cluster within the limit was not visited
    return Visits(nearest[:, 0], cosine[:, 0], others, visit, capped)


def centroid_distance(centroids: np.ndarray, home: np.ndarray, others: np.ndarray) -> np.ndarray:
    """|c_home - c_other| for every row's home and each of its `others` ([rows, k]; -1 gives 0), from
    the dot products of the distinct pairs of clusters (a row-by-row gather would be rows x k x dim)."""
    clusters = len(centroids)
    key = home[:, None].astype(np.int64) * clusters + np.maximum(others, 0)
    distinct, back = np.unique(key, return_inverse=True)
    dots = np.concatenate([np.einsum("ij,ij->i", centroids[chunk // clusters], centroids[chunk % clusters])
                           for chunk in np.array_split(distinct, max(1, len(distinct) // 65536))])
    apart = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * dots)).astype(np.float32)[back.reshape(key.shape)]
    return np.where(others >= 0, apart, 0.0)


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


def pairs_across(unit: np.ndarray, plan: Visits, eps: float) -> CrossPairs:
    """Every pair `plan` meets across clusters among `unit` rows (all in memory), as row indices:
    each cluster's visitors against its residents (`cross_pairs`), the visitors in runs whose
    products stay within semdedup.BLOCK_BYTES (a piece of a split cluster may hold 100,000 rows)."""
    rows, slot = np.nonzero(plan.visit)
    targets = plan.others[rows, slot]
    visiting, members = groups_of(targets), groups_of(plan.home)
    pairs, cosines = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    for cluster, at in visiting.items():
        mine = members.get(cluster, np.zeros(0, np.int64))
        run = max(1, semdedup.BLOCK_BYTES // (8 * max(1, len(mine))))  # padding may double a block's side
        for start in range(0, len(at), run):
            theirs = rows[at[start:start + run]]
            found = cross_pairs(unit[mine], plan.others[mine], unit[theirs], plan.home[theirs], eps)
            pairs.append(np.stack([theirs[found.pairs[:, 0]], mine[found.pairs[:, 1]]], axis=1))
            cosines.append(found.cosine)
    return CrossPairs(np.concatenate(pairs), np.concatenate(cosines))


def groups_of(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Indices per label, sorted once (not one scan of every row per label)."""
    order = np.argsort(labels, kind="stable")
    ids, starts = np.unique(labels[order], return_index=True)
    return {int(c): rows for c, rows in zip(ids, np.split(order, starts[1:]))}


def piece_pairs(unit: np.ndarray, pieces: list[np.ndarray], eps: float) -> tuple[list[np.ndarray], CrossPairs]:
    """The pieces of one cluster split over --max-cluster-size, each row moved to the piece whose
    centroid (the unit mean of its rows) is nearest, and the pairs across those pieces, met as pairs
    across clusters are but with the exact limit: every pair across pieces is found (`plan_visits`)
    unless a row has more than PIECE_PROBES pieces within it. The move makes every row's home its nearest centroid, which the proof needs; a
    piece may end a little over the size. Pieces of one cluster lie close together, so the exact
    limit (sqrt(2 eps) |cP - cQ| / 2) is narrow where it matters."""
    centroids = semdedup.unit_rows(np.stack([unit[piece].mean(axis=0) for piece in pieces]))
    plan = plan_visits(unit, centroids, min(len(pieces) - 1, PIECE_PROBES), eps, margin=None)
    return list(groups_of(plan.home).values()), pairs_across(unit, plan, eps)


def dedup_cluster(unit: np.ndarray, keys: list[str], centroid_cosine: np.ndarray, *, eps: float, keep: str,
                  seed: int, max_rows: int, rule: str, probes: int) -> semdedup.ClusterResult:
    """semdedup.dedup_cluster, and under the kept rule with `probes` (--cross-clusters > 0) the pieces
    of a cluster over `max_rows` compared with each other (`piece_pairs`): every pair across them comes
    back marked `across`, for the resolution that settles pairs across clusters."""
    pieces = semdedup.split_large(unit, max_rows, seed)
    between = None
    if rule == "kept" and probes and len(pieces) > 1:
        pieces, found = piece_pairs(unit, pieces, eps)
        between = (found.pairs, found.cosine)
    return semdedup.decide_pieces(unit, keys, centroid_cosine, pieces, eps=eps, keep=keep, seed=seed, rule=rule,
                                  between=between)


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
