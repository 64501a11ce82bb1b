"""Semantic deduplication, the algorithm (numpy + faiss; no I/O, no queue).

SemDeDup (Abbas et al., 2023): spherical k-means over unit vectors; inside each cluster the rows
are put in keep order (`hard`: farthest from the centroid first, `easy`: nearest first, `random`:
a seeded shuffle) and walked in that order. Two rules decide which rows go:

    kept      (the default) a row is removed when a row *kept* before it is at least `1 - eps` in
              cosine; that kept row is its stand-in. Every removed row has a kept row above the
              threshold and no two kept rows are above it (a greedy independent set of the
              threshold graph, in keep order).
    semdedup  NeMo Curator's rule: a row is removed when its best match among the rows before it
              is above the threshold, whether or not that row was itself removed. In a chain
              A ~ B ~ C it keeps A and removes B and C although C is not a duplicate of A.

The pairwise step is computed in row blocks (memory: block x cluster rows), never as the
full cluster x cluster matrix; a cluster above `max_rows` is split by a second k-means level
first. Under the kept rule the pieces are then met as clusters are (crosscluster.dedup_cluster)
and their pairs marked `across`, for the resolution that settles pairs across clusters; under
NeMo's rule pairs across the split are not compared, as pairs across clusters are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KEEP_ORDERS = ("hard", "easy", "random")
RULES = ("kept", "semdedup")
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
    nearest, cosine = nearest_centroids(rows, centroids, 1)
    return nearest[:, 0], cosine[:, 0]


def nearest_centroids(rows: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest centroids of every unit row, best first: (ids [rows, k] int32 (-1 past the
    last centroid), cosines [rows, k] float32)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    cosine, nearest = index.search(np.ascontiguousarray(rows, dtype=np.float32), k)
    return nearest.astype(np.int32), cosine.astype(np.float32)


def key_rank(keys: list[str]) -> np.ndarray:
    """Each key's position in sorted order: the tie-break of every keep order."""
    return np.argsort(np.argsort(np.asarray(keys, dtype=object)))


def keep_order(keys: list[str], centroid_cosine: np.ndarray, keep: str, seed: int) -> np.ndarray:
    """Row order inside one cluster: earlier rows are kept over later near-duplicates; ties by key."""
    if keep not in KEEP_ORDERS:
        raise ValueError(f"keep must be one of {KEEP_ORDERS}, not {keep!r}")
    tiebreak = key_rank(keys)
    if keep == "random":
        return np.random.default_rng(seed).permutation(len(keys))
    first = centroid_cosine if keep == "hard" else -centroid_cosine  # hard: least typical (farthest) first
    return np.lexsort((tiebreak, first))


@dataclass(frozen=True)
class EarlierMatches:
    """Per row (in keep order): its best cosine among the rows before it (-inf for the first) and that
    row's position (-1 for the first); under the kept rule, the best kept row before it for a removed
    row and none for a kept one, and every pair at or above the threshold as (earlier, later)
    positions with its cosine (the resolution across clusters needs them)."""

    cosine: np.ndarray
    position: np.ndarray
    pairs: np.ndarray
    pair_cosine: np.ndarray


def earlier_matches(unit: np.ndarray, rule: str = "semdedup", threshold: float = 1.0) -> EarlierMatches:
    """Best earlier match of every row of one cluster, in row blocks (NeMo's triu(X Xᵀ).max(0)).
    rule "kept": the pairs at or above `threshold` too, and the rows resolved by the kept rule."""
    if rule == "kept":
        return kept_rule(len(unit), *pairs_above(unit, np.float32(threshold)))
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
    return EarlierMatches(best, where, np.zeros((0, 2), np.int64), np.zeros(0, np.float32))


def pairs_above(unit: np.ndarray, limit: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Every pair at or above `limit` as (earlier, later) positions, sorted by the later row, and its
    cosine, in the row blocks of `earlier_matches`. The kept rule needs only these: no best match per
    row, no masked triangle."""
    n = len(unit)
    block = max(16, min(4096, BLOCK_BYTES // max(1, 4 * n)))
    pairs, cosines = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    for start in range(1, n, block):
        stop = min(n, start + block)
        sims = unit[start:stop] @ unit[:stop].T
        later, earlier = np.nonzero(sims >= limit)  # row-major: sorted by the later row
        before = earlier < later + start
        later, earlier = later[before], earlier[before]
        pairs.append(np.stack([earlier, later + start], axis=1).astype(np.int64))
        cosines.append(sims[later, earlier])
    return np.concatenate(pairs), np.concatenate(cosines)


def kept_rule(n: int, pairs: np.ndarray, cosine: np.ndarray) -> EarlierMatches:
    """Walk the rows in order: a row with a pair goes when one of its earlier partners was kept, and
    names the best such partner. Kept rows have no match (-inf, -1): a kept row stands for itself."""
    best = np.full(n, -np.inf, dtype=np.float32)
    where = np.full(n, -1, dtype=np.int64)
    removed = bytearray(n)
    earlier, later, sims = pairs[:, 0].tolist(), pairs[:, 1].tolist(), cosine.tolist()  # plain ints: most rows have one pair
    at = 0
    while at < len(later):  # pairs come sorted by their later row
        row, chosen, top = later[at], -1, -math.inf
        while at < len(later) and later[at] == row:
            if not removed[earlier[at]] and sims[at] > top:  # the first best, as argmax picks
                chosen, top = earlier[at], sims[at]
            at += 1
        if chosen >= 0:
            removed[row], where[row], best[row] = 1, chosen, top
    return EarlierMatches(best, where, pairs, cosine)


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
    """One cluster's rows in keep order: index into the cluster's input rows, kept, the best earlier
    match (input row index, -1 when none; kept rule: the best kept one) and its cosine (NaN when
    none), the row's rank in the job-wide keep order (ties broken by key), and (kept rule) every pair
    at or above the threshold as input row indices (earlier, later; across pieces: visitor, resident),
and which of them lie across pieces (`across`: the per-piece decisions do not hold them yet)."""

    order: np.ndarray
    kept: np.ndarray
    match: np.ndarray
    cosine: np.ndarray
    rank: np.ndarray
    pairs: np.ndarray
    pair_cosine: np.ndarray
    across: np.ndarray


def order_rank(centroid_cosine: np.ndarray, order: np.ndarray, keep: str) -> np.ndarray:
    """A float per row (in `order`) that sorts rows of every cluster the way keep order sorts them
    inside one: the centroid cosine (hard), its negation (easy), the position's share (random)."""
    if keep == "random":
        return np.arange(len(order), dtype=np.float64) / max(1, len(order))
    first = centroid_cosine[order].astype(np.float64)
    return first if keep == "hard" else -first


def dedup_cluster(unit: np.ndarray, keys: list[str], centroid_cosine: np.ndarray, *, eps: float, keep: str,
                  seed: int, max_rows: int, rule: str = "kept") -> ClusterResult:
    """Kept and duplicate rows of one cluster (unit rows); see the module docstring. The pieces of a
    cluster over `max_rows` are not compared here (crosscluster.dedup_cluster compares them)."""
    return decide_pieces(unit, keys, centroid_cosine, split_large(unit, max_rows, seed), eps=eps, keep=keep,
                         seed=seed, rule=rule)


def decide_pieces(unit: np.ndarray, keys: list[str], centroid_cosine: np.ndarray, pieces: list[np.ndarray], *,
                  eps: float, keep: str, seed: int, rule: str,
                  between: tuple[np.ndarray, np.ndarray] | None = None) -> ClusterResult:
    """The rule inside each piece of one cluster (row indices), and `between`: the pairs across pieces
    with their cosines, passed through marked `across` for the resolution across clusters."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    threshold = np.float32(1.0 - eps)
    between = between or (np.zeros((0, 2), np.int64), np.zeros(0, np.float32))
    orders, kept, match, cosine, rank, pairs, pair_cosine = [], [], [], [], [], [], []
    for piece in pieces:
        order = piece[keep_order([keys[i] for i in piece], centroid_cosine[piece], keep, seed)]
        found = earlier_matches(unit[order], rule, float(threshold))
        has = found.position >= 0
        orders.append(order)
        kept.append(~(found.cosine >= threshold))
        match.append(np.where(has, order[np.maximum(found.position, 0)], -1))
        cosine.append(np.where(has, found.cosine, np.nan).astype(np.float32))
        rank.append(order_rank(centroid_cosine, order, keep))
        pairs.append(order[found.pairs])
        pair_cosine.append(found.pair_cosine)
    inside = sum(len(p) for p in pairs)
    pairs.append(between[0])
    pair_cosine.append(between[1])
    return ClusterResult(np.concatenate(orders), np.concatenate(kept), np.concatenate(match),
                         np.concatenate(cosine), np.concatenate(rank), np.concatenate(pairs).reshape(-1, 2),
                         np.concatenate(pair_cosine), np.arange(inside + len(between[0])) >= inside)


def greedy_reference(unit: np.ndarray, rank: np.ndarray, keys: list[str], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The kept rule over a whole set by brute force: rows in (rank, key) order, each removed when a
    row kept before it is at or above 1 - eps. Returns (kept mask, stand-in row or -1). For tests and
    bench/ only: memory is n x n."""
    order = np.lexsort((key_rank(keys), rank))
    above = (unit @ unit.T) >= np.float32(1.0 - eps)
    kept = np.zeros(len(unit), dtype=bool)
    stand_in = np.full(len(unit), -1)
    for row in order:
        hits = np.flatnonzero(above[row] & kept)
        if len(hits):
            stand_in[row] = hits[np.argmax(unit[hits] @ unit[row])]
        else:
            kept[row] = True
    return kept, stand_in


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
