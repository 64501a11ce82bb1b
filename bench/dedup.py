"""dedup at scale, in one process: N random unit vectors plus planted near-duplicates, through
vitbatch's own algorithm (workers/curation/semdedup.py: seeded-sample k-means, assignment, blocked pairwise
per cluster) and through NeMo Curator's (full triu(X Xᵀ) per cluster, numpy) on the same clusters;
seconds per stage, peak RSS, and whether the kept sets are equal.

    python -m bench.dedup --vectors 1000000 --dim 384
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from bench.common import report
from workers.curation import semdedup


def planted_vectors(n: int, dim: int, dup_share: float, seed: int) -> np.ndarray:
    """float16 rows: (1 - dup_share) * n random directions, the rest noisy copies of some of them (cos ~0.995)."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_share)
    base = rng.standard_normal((n - n_dup, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    sources = rng.integers(0, len(base), n_dup)
    noise = rng.standard_normal((n_dup, dim), dtype=np.float32) * (0.07 / np.sqrt(dim))
    return np.concatenate([base, base[sources] + noise]).astype(np.float16)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dup-share", type=float, default=0.1)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nemo-max-rows", type=int, default=20_000, help="NeMo's n x n matrix: skip larger clusters")
    args = parser.parse_args()
    figures: dict = {"vectors": args.vectors, "dim": args.dim}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    unit = semdedup.unit_rows(planted_vectors(args.vectors, args.dim, args.dup_share, args.seed))
    seconds["generate"] = time.perf_counter() - t0
    clusters = round(np.sqrt(args.vectors))
    sample = np.random.default_rng(args.seed).choice(args.vectors, min(args.vectors, 64 * clusters), replace=False)
    t0 = time.perf_counter()
    centroids = semdedup.fit_centroids(unit[np.sort(sample)], clusters, args.seed)
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels, cosine = semdedup.assign(unit, centroids)
    seconds["assign"] = time.perf_counter() - t0
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(clusters + 1))
    keys = np.char.mod("%08d", np.arange(args.vectors)).tolist()
    kept = np.zeros(args.vectors, dtype=bool)
    t0 = time.perf_counter()
    for c in range(clusters):
        rows = order[bounds[c]:bounds[c + 1]]
        found = semdedup.dedup_cluster(unit[rows], [keys[i] for i in rows], cosine[rows], eps=args.eps, keep="hard",
                                       seed=args.seed + c, max_rows=100_000)
        kept[rows[found.order]] = found.kept
    seconds["pairs"] = time.perf_counter() - t0
    figures["vitbatch_peak_rss_mb"] = round(peak_rss_mb())
    t0 = time.perf_counter()
    differ = skipped = 0
    for c in range(clusters):
        rows = order[bounds[c]:bounds[c + 1]]
        if len(rows) > args.nemo_max_rows:
            skipped += 1
            continue
        differ += int((semdedup.nemo_reference(unit[rows], cosine[rows], args.eps, "hard") != kept[rows]).sum())
    seconds["nemo_pairs"] = time.perf_counter() - t0
    figures |= {"clusters": clusters, "largest_cluster": int(np.diff(bounds).max()), "removed": int((~kept).sum()),
                "planted": int(args.vectors * args.dup_share), "rows_differing_from_nemo": differ,
                "nemo_clusters_skipped": skipped, "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "peak_rss_mb": round(peak_rss_mb())}
    report("dedup", figures)


if __name__ == "__main__":
    main()
