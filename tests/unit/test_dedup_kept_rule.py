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


def test_rows_visit_only_the_near_other_clusters_that_can_hold_a_near_duplicate():
    centroids = semdedup.unit_rows(np.array([[1, 0, 0], [0.9, 0.44, 0], [0, 0, 1]], dtype=np.float32))
    row = semdedup.unit_rows(np.array([[1, 0.05, 0]], dtype=np.float32))
    home, _, visited = crosscluster.visits(row, centroids, 2, EPS)
    assert home.tolist() == [0] and visited[0, 0] == 1
    assert (visited[0, 1:] == -1).all()  # cluster 2 is too far to hold one; there are no others


def test_a_pair_across_a_boundary_is_found_between_the_rows_that_visit_each_other():
    """Cluster 1's visitors from cluster 0 meet only cluster 1's rows that visit cluster 0 back."""
    x = semdedup.unit_rows(np.array([[1, 0.1, 0], [0, 1, 0]], dtype=np.float32))  # visitors from 0 and 2
    resident = semdedup.unit_rows(np.array([[1, 0.12, 0], [1, 0.11, 0.01], [0.2, 1, 0]], dtype=np.float32))
    visits = np.array([[0, -1], [-1, -1], [2, 0]])  # the second row is near but does not visit cluster 0
    found = crosscluster.cross_pairs(resident, visits, x, np.array([0, 2]), EPS)
    assert found.pairs.tolist() == [[0, 0]] and found.cosine[0] >= np.float32(1 - EPS)


def test_a_pair_neither_of_whose_rows_has_the_others_cluster_nearest_is_found_by_its_margins():
    """x (home 4) and y (home 0) are near-duplicates; each has cluster 3 nearest after its own, so with
    one probe neither visits the other's cluster by rank. x's margin to cluster 0 is within
    VISIT_MARGIN sqrt(2 eps) and y counts cluster 4 within BACK_MARGIN: x visits 0 and meets y there."""
    centroids = semdedup.unit_rows(np.array([[-9, 9, 4], [-3, -1, -1], [1, -3, -3], [8, -5, -3], [7, 0, 9]],
                                            dtype=np.float32))
    rows = semdedup.unit_rows(np.array([[4, 6, -2], [3.5, 5.5, -2]], dtype=np.float32))
    plan = crosscluster.plan_visits(rows, centroids, 1, EPS)
    assert plan.home.tolist() == [4, 0] and plan.others[:, 0].tolist() == [3, 3]  # by rank: cluster 3 only
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
