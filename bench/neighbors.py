"""neighbors, exact against approximate, in one process: Q query vectors against N indexed vectors
(384-d unit rows; a seeded mixture of clusters of about 50, as embeddings of an image set gather,
and uniform random directions, the case no index helps), through the job's own algorithm
(workers/curation/knn.py): exact = faiss flat inner product in blocks of 65,536 indexed rows with a
running top-k; approximate = IVF-Flat (4 x sqrt(N) lists, k-means on a seeded sample), nprobe tuned
to --recall-target on 256 seeded queries, then every query searched. Seconds per step, recall@k of
the approximate rows against the exact ones over every query, and from them the queries at which
the index has paid for itself (build + tune = queries x the per-query saving) on one process.

    python -m bench.neighbors --sizes 20000,100000,300000 --uniform-sizes 100000 --queries 2000
    python -m bench.neighbors --sizes 20000,100000 --uniform-sizes '' --hnsw   # the index not chosen

--hnsw adds faiss's HNSW (IndexHNSWFlat, M 32, efConstruction 80, every row added on faiss's
threads) beside IVF: its build seconds and the smallest power-of-two efSearch reaching the target.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import report
from workers.curation import knn, semdedup

TUNE_QUERIES = 256


def clustered_vectors(n: int, dim: int, seed: int, per_cluster: int = 50, spread: float = 1.0) -> np.ndarray:
    """float16 unit rows around n / per_cluster random directions (member-to-centre cosine ~0.7)."""
    rng = np.random.default_rng(seed)
    centres = semdedup.unit_rows(rng.standard_normal((max(1, n // per_cluster), dim), dtype=np.float32))
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return semdedup.unit_rows(centres[rng.integers(0, len(centres), n)] + noise).astype(np.float16)


def uniform_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return semdedup.unit_rows(rng.standard_normal((n, dim), dtype=np.float32)).astype(np.float16)


def one_size(rows: np.ndarray, queries: np.ndarray, k: int, target: float, seed: int, per_sqrt: float) -> dict:
    unit, q = semdedup.unit_rows(rows), semdedup.unit_rows(queries)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    exact_cosines, _ = knn.exact_top_k(q, unit, k)
    seconds["exact"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lists = knn.lists_for(len(unit), per_sqrt)
    index = knn.train_index(unit[knn.sample_rows(len(unit), knn.SAMPLE_PER_LIST * lists, seed)], lists, seed)
    index.add(unit)
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tune = q[knn.sample_rows(len(q), TUNE_QUERIES, seed + 1)]
    nprobe, _ = knn.tune_nprobe(index, tune, knn.exact_top_k(tune, unit, k)[0], k, target)
    seconds["tune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    found, _ = knn.search_index(index, q, k, nprobe)
    seconds["search"] = time.perf_counter() - t0
    exact_ms, search_ms = 1000 * seconds["exact"] / len(q), 1000 * seconds["search"] / len(q)
    fixed = seconds["build"] + seconds["tune"]
    saving = exact_ms - search_ms
    return {"vectors": len(rows), "queries": len(queries), "lists": lists, "nprobe": nprobe,
            "recall_at_k": round(knn.recall_at_k(found, exact_cosines, k), 4),
            "seconds": {name: round(value, 2) for name, value in seconds.items()},
            "exact_ms_per_query": round(exact_ms, 3), "approximate_ms_per_query": round(search_ms, 3),
            "pays_off_from_queries": round(1000 * fixed / saving) if saving > 0 else None,
            "self_neighbors_s": {"exact": round(exact_ms * len(rows) / 1000, 1),
                                 "approximate": round(fixed + search_ms * len(rows) / 1000, 1)}}


def hnsw(unit: np.ndarray, q: np.ndarray, exact_cosines: np.ndarray, k: int, target: float) -> dict:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(unit.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(unit)
    build = time.perf_counter() - t0
    ef = k
    while True:
        index.hnsw.efSearch = ef
        t0 = time.perf_counter()
        found, _ = index.search(q, k)
        search = time.perf_counter() - t0
        recall = knn.recall_at_k(found, exact_cosines, k)
        if recall >= target or ef >= 1024:
            return {"build_s": round(build, 2), "ef_search": ef, "search_s": round(search, 2),
                    "recall_at_k": round(recall, 4)}
        ef *= 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="20000,100000,300000", help="indexed clustered vectors, comma-separated")
    parser.add_argument("--uniform-sizes", default="100000", help="indexed uniform random vectors ('' for none)")
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--lists-per-sqrt", type=float, default=4.0, help="the index's lists: this x sqrt(N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw", action="store_true", help="also build and search faiss HNSW (slow to build)")
    args = parser.parse_args()
    rows = []
    runs = [("clustered", int(s)) for s in args.sizes.split(",") if s]
    runs += [("uniform", int(s)) for s in args.uniform_sizes.split(",") if s]
    for kind, size in runs:  # each its own set, the queries drawn from the same distribution
        make = clustered_vectors if kind == "clustered" else uniform_vectors
        data = make(size + args.queries, args.dim, args.seed)
        load = os.getloadavg()[0]
        rows.append({"data": kind, **one_size(data[args.queries:], data[:args.queries], args.k, args.recall_target,
                                              args.seed, args.lists_per_sqrt), "load_1min_before": round(load, 1)})
        if args.hnsw:
            unit, q = semdedup.unit_rows(data[args.queries:]), semdedup.unit_rows(data[:args.queries])
            rows[-1]["hnsw"] = hnsw(unit, q, knn.exact_top_k(q, unit, args.k)[0], args.k, args.recall_target)
        print(rows[-1], flush=True)
    report("neighbors", {"dim": args.dim, "k": args.k, "recall_target": args.recall_target,
                         "lists_per_sqrt": args.lists_per_sqrt, "sizes": rows})


if __name__ == "__main__":
    main()
