"""dedup at scale, in one process: N random unit vectors plus planted near-duplicates, through
vitbatch's own algorithm (workers/curation/semdedup.py and crosscluster.py: seeded-sample k-means,
assignment with the visited clusters, the rule inside every cluster in row blocks, the pairs across
clusters and their resolution), each phase as the job runs it; seconds (wall and CPU) per phase,
peak RSS, and the kept pairs above the threshold that lie in different clusters.

    python -m bench.dedup --vectors 1000000 --dim 384                      # the kept rule (default)
    python -m bench.dedup --vectors 1000000 --dim 384 --rule semdedup     # NeMo's rule, clusters alone

Near-duplicates here are only a source row and its planted copies (random directions in 384-d are
far below 0.99 of one another), so the kept pairs above the threshold are counted exactly within
those groups. --nemo also runs NeMo Curator's full-matrix algorithm on the same clusters (rule
semdedup: the kept sets must be equal).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import numpy as np

from bench.common import report
from workers.curation import crosscluster, semdedup


def planted_vectors(n: int, dim: int, dup_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 rows: (1 - dup_share) * n random directions, the rest noisy copies of some of them (cos ~0.995),
    and each row's source (its own index for a random direction)."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_share)
    base = rng.standard_normal((n - n_dup, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    sources = rng.integers(0, len(base), n_dup)
    noise = rng.standard_normal((n_dup, dim), dtype=np.float32) * (0.07 / np.sqrt(dim))
    vectors = np.concatenate([base, base[sources] + noise]).astype(np.float16)
    return vectors, np.concatenate([np.arange(len(base)), sources])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Wall and CPU seconds per phase (CPU: this process's user + system, which another tenant of a
    shared machine does not inflate)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, work: Callable):
        wall, cpu = time.perf_counter(), time.process_time()
        out = work()
        self.wall[name] = round(time.perf_counter() - wall, 2)
        self.cpu[name] = round(time.process_time() - cpu, 2)
        return out


def in_clusters(unit, labels, cosine, keys, clusters, args, probes):
    """The rule inside every cluster: kept mask, rank, the pairs (global row ids) with their cosines,
    and which pairs lie across the pieces of a cluster over --max-cluster-size."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(clusters + 1))
    kept, rank = np.zeros(len(unit), dtype=bool), np.zeros(len(unit))
    pairs, pair_cosine, across = [], [], []
    for c in range(clusters):
        rows = order[bounds[c]:bounds[c + 1]]
        found = crosscluster.dedup_cluster(unit[rows], [keys[i] for i in rows], cosine[rows], eps=args.eps, keep="hard",
                                           seed=args.seed + c, max_rows=args.max_cluster_size, rule=args.rule,
                                           probes=probes)
        kept[rows[found.order]], rank[rows[found.order]] = found.kept, found.rank
        pairs.append(rows[found.pairs])
        pair_cosine.append(found.pair_cosine)
        across.append(found.across)
    return kept, rank, np.concatenate(pairs).reshape(-1, 2), np.concatenate(pair_cosine), np.concatenate(across)


def kept_pairs_above(unit, source, kept, labels, eps) -> tuple[int, int, int]:
    """(kept pairs at or above 1 - eps, those of them in different clusters, removed rows with no kept
    row at or above 1 - eps), exactly: near-duplicates are a source row and its planted copies."""
    groups = np.argsort(source, kind="stable")
    bounds = np.flatnonzero(np.diff(source[groups])) + 1
    total = across = orphans = 0
    for members in np.split(groups, bounds):
        if len(members) < 2:
            orphans += int((~kept[members]).sum())
            continue
        above, mine = unit[members] @ unit[members].T >= np.float32(1 - eps), kept[members]
        orphans += int((~mine & ~(above & mine[None, :]).any(axis=1)).sum())
        a, b = np.nonzero(np.triu(above & mine[:, None] & mine[None, :], k=1))
        total += len(a)
        across += int((labels[members[a]] != labels[members[b]]).sum())
    return total, across, orphans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dup-share", type=float, default=0.1)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", choices=semdedup.RULES, default="kept")
    parser.add_argument("--cross-clusters", type=int, default=12, help="rule kept: most other clusters a row visits")
    parser.add_argument("--margin", type=float, default=crosscluster.VISIT_MARGIN,
                        help="rule kept: visit clusters within this many sqrt(2 eps) of the home cosine")
    parser.add_argument("--max-cluster-size", type=int, default=100_000, help="split larger clusters into pieces")
    parser.add_argument("--nemo", action="store_true", help="also NeMo's full-matrix algorithm (rule semdedup)")
    parser.add_argument("--nemo-max-rows", type=int, default=20_000, help="NeMo's n x n matrix: skip larger clusters")
    args = parser.parse_args()
    probes = args.cross_clusters if args.rule == "kept" else 0
    timer = Timer()
    vectors, source = timer.run("generate", lambda: planted_vectors(args.vectors, args.dim, args.dup_share, args.seed))
    unit = semdedup.unit_rows(vectors)
    clusters = round(np.sqrt(args.vectors))
    sample = np.random.default_rng(args.seed).choice(args.vectors, min(args.vectors, 64 * clusters), replace=False)
    centroids = timer.run("fit", lambda: semdedup.fit_centroids(unit[np.sort(sample)], clusters, args.seed))
    planned = timer.run("assign", lambda: crosscluster.plan_visits(unit, centroids, probes, args.eps, args.margin))
    labels, cosine = planned.home, planned.cosine
    keys = np.char.mod("%08d", np.arange(args.vectors)).tolist()
    kept, rank, pairs, pair_cosine, pieces = timer.run(
        "pairs", lambda: in_clusters(unit, labels, cosine, keys, clusters, args, probes))
    removed_in_clusters = int((~kept).sum())
    figures: dict = {"vectors": args.vectors, "dim": args.dim, "rule": args.rule, "cross_clusters": probes,
                     "margin": args.margin, "clusters": clusters, "largest_cluster": int(np.bincount(labels).max())}
    if args.rule == "kept":
        cross = timer.run("across", lambda: crosscluster.pairs_across(unit, planned, args.eps))
        everything = np.concatenate([pairs, cross.pairs])
        flags = np.concatenate([pieces, np.ones(len(cross.pairs), bool)])
        found = timer.run("resolve", lambda: crosscluster.resolve(
            rank, keys, everything, np.concatenate([pair_cosine, cross.cosine]), flags))
        kept[found.rows] = found.kept
        figures |= {"visits": int(planned.visit.sum()), "rows_capped": int(planned.capped.sum()),
                    "cross_pairs": len(cross.pairs), "piece_pairs": int(pieces.sum()),
                    "in_cluster_pairs": int((~pieces).sum())}
    figures["vitbatch_peak_rss_mb"] = round(peak_rss_mb())
    total, across, orphans = kept_pairs_above(unit, source, kept, labels, args.eps)
    figures |= {"removed": int((~kept).sum()), "removed_in_clusters": removed_in_clusters,
                "planted": int(args.vectors * args.dup_share), "kept_pairs_above": total,
                "kept_pairs_above_across_clusters": across, "removed_without_kept_stand_in": orphans}
    if args.nemo:
        figures["rows_differing_from_nemo"] = timer.run("nemo_pairs", lambda: nemo_differ(unit, labels, cosine, kept, args))
    phases = [p for p in timer.wall if p not in ("generate", "nemo_pairs")]
    figures |= {"seconds": timer.wall, "cpu_seconds": timer.cpu, "dedup_seconds": round(sum(timer.wall[p] for p in phases), 2),
                "dedup_cpu_seconds": round(sum(timer.cpu[p] for p in phases), 2), "peak_rss_mb": round(peak_rss_mb())}
    report("dedup", figures)


def nemo_differ(unit, labels, cosine, kept, args) -> int | str:
    """Rows whose kept flag differs from NeMo's algorithm on the same clusters (rule semdedup only)."""
    if args.rule != "semdedup":
        return "n/a: NeMo's rule is --rule semdedup"
    differ = 0
    for c in range(labels.max() + 1):
        rows = np.flatnonzero(labels == c)
        if 0 < len(rows) <= args.nemo_max_rows:
            differ += int((semdedup.nemo_reference(unit[rows], cosine[rows], args.eps, "hard") != kept[rows]).sum())
    return differ


if __name__ == "__main__":
    main()
