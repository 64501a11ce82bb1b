"""The kept rule and its resolution across clusters on small vectors built to hold chains (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.curation import crosscluster, semdedup

EPS = 0.01


def chains(seed: int, n: int = 80, links: int = 3, dim: int = 16) -> np.ndarray:
    """Unit rows: n random directions, then `links` steps away from the first n // 3 of them, each step
    about 0.993 in cosine from the one before (so two steps apart are below 0.99)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    base, step = rows[: n // 3], rng.standard_normal((n // 3, dim)).astype(np.float32)
    step *= 0.12 * np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(step, axis=1, keepdims=True)
    return semdedup.unit_rows(np.concatenate([rows] + [base + k * step for k in range(1, links + 1)]))


def decided(unit: np.ndarray, rule: str, block_bytes: int, monkeypatch) -> tuple[semdedup.ClusterResult, np.ndarray]:
    monkeypatch.setattr(semdedup, "BLOCK_BYTES", block_bytes)
    keys = [f"k{i:04d}" for i in range(len(unit))]
    centroid = unit.mean(axis=0) / np.linalg.norm(unit.mean(axis=0))
    found = semdedup.dedup_cluster(unit, keys, unit @ centroid, eps=EPS, keep="hard", seed=0, max_rows=10_000,
                                   rule=rule)
    kept = np.zeros(len(unit), dtype=bool)
    kept[found.order] = found.kept
    return found, kept


@pytest.mark.parametrize("block_bytes", [16 * 4 * 200, 256 << 20])  # blocks of 16 rows, and one block
@pytest.mark.parametrize("seed", range(4))
def test_the_kept_rule_in_blocks_equals_a_greedy_pass_over_every_pair(seed, block_bytes, monkeypatch):
    unit = chains(seed)
    found, kept = decided(unit, "kept", block_bytes, monkeypatch)
    rank = np.zeros(len(unit))
    rank[found.order] = found.rank
    reference, stand_in = semdedup.greedy_reference(unit, rank, [f"k{i:04d}" for i in range(len(unit))], EPS)
    assert (~kept).sum() > 0 and (kept == reference).all()
    match = np.full(len(unit), -1)
    match[found.order] = found.match
    assert (match[~kept] == stand_in[~kept]).all() and kept[match[~kept]].all()
    above = np.triu(unit @ unit.T >= np.float32(1 - EPS), k=1)
    assert len(found.pairs) == above.sum() and above[found.pairs.min(axis=1), found.pairs.max(axis=1)].all()


def test_nemos_rule_removes_a_chains_far_end_that_nothing_kept_stands_for(monkeypatch):
    unit = chains(0)
    _, kept = decided(unit, "semdedup", 256 << 20, monkeypatch)
    sims = unit @ unit.T >= np.float32(1 - EPS)
    orphans = [row for row in np.flatnonzero(~kept) if not sims[row, kept].any()]
    assert orphans
    _, ours = decided(unit, "kept", 256 << 20, monkeypatch)
    assert all(sims[row, ours].any() for row in np.flatnonzero(~ours))


def test_a_pair_across_clusters_removes_the_later_row_and_gives_back_the_row_it_stood_for():
    """A (cluster 0) ~ B (cluster 1) ~ C (cluster 1), A not ~ C, order A, B, C: cluster 1 alone kept B
    and removed C; across clusters B goes (A is before it) and C comes back (nothing kept is near it)."""
    rank, keys = np.array([0.1, 0.2, 0.3]), ["a", "b", "c"]
    pairs, cosine = np.array([[1, 2], [0, 1]]), np.array([0.995, 0.993], dtype=np.float32)
    found = crosscluster.resolve(rank, keys, pairs, cosine, np.array([False, True]))
    assert found.rows.tolist() == [0, 1, 2]
    assert found.kept.tolist() == [True, False, True]
    assert found.stand_in.tolist() == [-1, 0, -1] and found.cosine[1] == np.float32(0.993)


def test_groups_without_a_pair_across_clusters_are_left_as_their_clusters_decided():
    found = crosscluster.resolve(np.arange(4.0), list("abcd"), np.array([[0, 1], [2, 3]]),
                                 np.array([0.999, 0.999], dtype=np.float32), np.array([False, True]))
    assert found.rows.tolist() == [2, 3] and found.kept.tolist() == [True, False]


def test_rows_visit_only_the_other_clusters_within_the_limit_however_many_probes_allow():
    """Cluster 1 is the first row's nearest other cluster but 0.08 below its home cosine: past the exact
    bound sqrt(2 eps) |c0 - c1| = 0.064 (no near-duplicate can lie there) and past the default limit,
    so neither visited (--cross-clusters is a cap, not a count) nor counted. The second row is 0.023
    below: within the exact limit (0.032) it visits; past VISIT_MARGIN sqrt(2 eps) (0.018) but within
    twice that it only counts cluster 1 (meets its visitors)."""
    centroids = semdedup.unit_rows(np.array([[1, 0, 0], [0.9, 0.44, 0], [0, 0, 1]], dtype=np.float32))
    rows = semdedup.unit_rows(np.array([[1, 0.05, 0], [1, 0.18, 0]], dtype=np.float32))
    plan = crosscluster.plan_visits(rows, centroids, 2, EPS)
    exact = crosscluster.plan_visits(rows, centroids, 2, EPS, margin=None)
    assert plan.home.tolist() == [0, 0] and (plan.others[0] == -1).all() and (exact.others[0] == -1).all()
    assert plan.others[1, 0] == 1 and not plan.visit.any() and exact.visit[1].tolist()[:2] == [True, False]
    assert not (plan.others[:, 1:] >= 0).any() and not plan.capped.any()  # cluster 2 is too far to hold one


def test_a_pair_across_a_boundary_is_found_between_the_rows_that_visit_each_other():
    """Cluster 1's visitors from cluster 0 meet only cluster 1's rows that visit cluster 0 back."""
    x = semdedup.unit_rows(np.array([[1, 0.1, 0], [0, 1, 0]], dtype=np.float32))  # visitors from 0 and 2
    resident = semdedup.unit_rows(np.array([[1, 0.12, 0], [1, 0.11, 0.01], [0.2, 1, 0]], dtype=np.float32))
    visits = np.array([[0, -1], [-1, -1], [2, 0]])  # the second row is near but does not visit cluster 0
    found = crosscluster.cross_pairs(resident, visits, x, np.array([0, 2]), EPS)
    assert found.pairs.tolist() == [[0, 0]] and found.cosine[0] >= np.float32(1 - EPS)


def test_a_pair_neither_of_whose_rows_has_the_others_cluster_nearest_is_found_by_its_margins():
    """x (home 4) and y (home 0) are near-duplicates; each has cluster 3 nearest after its own, so a
    single visit by rank would miss the pair. x's margin to cluster 0 is within VISIT_MARGIN sqrt(2 eps)
    and y counts cluster 4 within twice that: x visits 0 and meets y there."""
    centroids = semdedup.unit_rows(np.array([[-9, 9, 4], [-3, -1, -1], [1, -3, -3], [8, -5, -3], [7, 0, 9]],
                                            dtype=np.float32))
    rows = semdedup.unit_rows(np.array([[4, 6, -2], [3.5, 5.5, -2]], dtype=np.float32))
    nearest, _ = semdedup.nearest_centroids(rows, centroids, 2)
    assert nearest[:, 1].tolist() == [3, 3]  # by rank: cluster 3 only
    plan = crosscluster.plan_visits(rows, centroids, 4, EPS)
    assert plan.home.tolist() == [4, 0]
    assert plan.visit[0, plan.others[0] == 0].all() and (plan.others[1] == 4).any()
    found = crosscluster.cross_pairs(rows[1:], plan.others[1:], rows[:1], plan.home[:1], EPS)
    assert found.pairs.tolist() == [[0, 0]] and found.cosine[0] >= np.float32(1 - EPS)


def test_batched_products_find_every_pair_the_blocks_hold():
    """Many home clusters of different sizes: every (visitor, resident) pair above the threshold whose
    resident counts the visitor's home is found, once."""
    rng = np.random.default_rng(3)
    resident = semdedup.unit_rows(rng.standard_normal((60, 8)).astype(np.float32))
    visitor = semdedup.unit_rows(resident[rng.integers(0, 60, 90)] + 0.02 * rng.standard_normal((90, 8)))
    home = rng.integers(1, 20, 90)
    distinct = np.stack([rng.permutation(np.arange(1, 20))[:5] for _ in range(60)])  # a row's clusters differ
    visits = np.where(rng.random((60, 5)) < 0.6, distinct, -1)
    sims = visitor @ resident.T
    met = (visits[None, :, :] == home[:, None, None]).any(axis=2)
    expected = sorted(map(list, zip(*np.nonzero(met & (sims >= np.float32(1 - EPS))))))
    found = crosscluster.cross_pairs(resident, visits, visitor, home, EPS)
    assert len(expected) > 10 and sorted(found.pairs.tolist()) == expected


def clustered(seed: int, n: int = 1500, dim: int = 8, clusters: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around a few directions, half of them with a near-duplicate a random step away (in 8-d
    a step often runs along the centroids' difference, the case the default margin may miss), and
    k-means centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, dim)).astype(np.float32)
    rows = semdedup.unit_rows(centres[rng.integers(0, 6, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32))
    steps = semdedup.unit_rows(rng.standard_normal((n // 2, dim)).astype(np.float32))
    copies = rows[: n // 2] + 0.14 * steps * rng.random((n // 2, 1)).astype(np.float32)
    unit = semdedup.unit_rows(np.concatenate([rows, copies]))
    return unit, semdedup.fit_centroids(unit, clusters, seed)


def brute_pairs_across(unit: np.ndarray, home: np.ndarray) -> set[tuple[int, int]]:
    a, b = np.nonzero(np.triu(unit @ unit.T >= np.float32(1 - EPS), k=1))
    return {(i, j) for i, j in zip(a.tolist(), b.tolist()) if home[i] != home[j]}


def found_pairs(found: crosscluster.CrossPairs) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in found.pairs.tolist()}


@pytest.mark.parametrize("seed", range(3))
def test_with_the_exact_limit_every_pair_across_clusters_is_found_as_brute_force_finds_it(seed):
    """The bound in `plan_visits`: two margins of a pair add up to at most sqrt(2 eps) |cX - cY|, so
    with that limit (`margin` None) and no cap cutting a row's list no pair across clusters is missed."""
    unit, centroids = clustered(seed)
    plan = crosscluster.plan_visits(unit, centroids, len(centroids) - 1, EPS, margin=None)
    expected = brute_pairs_across(unit, plan.home)
    assert len(expected) > 20 and not plan.capped.any()
    assert found_pairs(crosscluster.pairs_across(unit, plan, EPS)) == expected


@pytest.mark.parametrize("seed", range(3))
def test_the_default_margin_finds_every_pair_whose_margins_add_up_to_twice_it(seed):
    """The proven part of the default: a pair whose two margins add up to at most 2 VISIT_MARGIN
    sqrt(2 eps), on rows no cap cut, is found; the rest may be (both sets checked by brute force)."""
    unit, centroids = clustered(seed)
    plan = crosscluster.plan_visits(unit, centroids, 4, EPS)
    found = found_pairs(crosscluster.pairs_across(unit, plan, EPS))
    sims = unit @ centroids.T
    limit = 2 * crosscluster.VISIT_MARGIN * np.sqrt(2 * EPS)
    covered = {(i, j) for i, j in brute_pairs_across(unit, plan.home) if not (plan.capped[i] or plan.capped[j])
               and sims[i, plan.home[i]] - sims[i, plan.home[j]] + sims[j, plan.home[j]] - sims[j, plan.home[i]] <= limit}
    assert len(covered) > 10 and covered <= found <= brute_pairs_across(unit, plan.home)
    assert found < brute_pairs_across(unit, plan.home), "in 8-d some pairs lie along the centroids' difference"


def test_pairs_across_the_pieces_of_a_split_cluster_are_found_and_resolved_as_a_greedy_pass_over_every_pair():
    """A cluster over max_rows is split into pieces; under the kept rule the pairs across pieces come
    back marked `across`, and resolving them gives the greedy pass over the whole cluster (before: the
    pieces were never compared, and a pair split by them stayed kept on both sides)."""
    unit = chains(1, n=300)
    keys = [f"k{i:04d}" for i in range(len(unit))]
    centroid = semdedup.unit_rows(unit.mean(axis=0, keepdims=True))[0]
    found = crosscluster.dedup_cluster(unit, keys, unit @ centroid, eps=EPS, keep="hard", seed=0, max_rows=100,
                                       rule="kept", probes=4)
    every = np.triu(unit @ unit.T >= np.float32(1 - EPS), k=1)
    distinct = np.unique(np.sort(found.pairs, axis=1), axis=0)  # a pair across pieces may be met from both
    assert found.across.any() and len(distinct) == every.sum() and every[distinct[:, 0], distinct[:, 1]].all()
    rank = np.zeros(len(unit))
    rank[found.order] = found.rank
    kept = np.zeros(len(unit), dtype=bool)
    kept[found.order] = found.kept
    resolved = crosscluster.resolve(rank, keys, found.pairs, found.pair_cosine, found.across)
    kept[resolved.rows] = resolved.kept
    reference, _ = semdedup.greedy_reference(unit, rank, keys, EPS)
    assert (kept == reference).all()
