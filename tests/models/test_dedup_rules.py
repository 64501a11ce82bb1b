"""dedup's kept rule on real images with chains of near-duplicates (A, A re-encoded, that re-encoded
again, ...; each link near the one before, the far end no longer near A) and --clusters forced high so
that near-duplicates land in different clusters, embedded by a tiny fixed ViT and checked against brute
force: every pair's fp32 cosine, and the kept rule run greedily over the whole set in the job's order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_curation import write_chains

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_embeddings, read_kept_keys, read_table, success_record
from orchestrator.store.storage import ObjectStore, join
from workers.context import WorkerContext
from workers.curation import semdedup
from workers.inprocess import run_local, run_vectors_local

CLUSTERS = 16


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, hf_model_dir) -> dict:
    root = tmp_path_factory.mktemp("chains")
    chains = write_chains(root / "images")
    spec = parse_spec({"kind": "embed", "input": str(root / "images"), "output": str(root / "emb"),
                       "model": str(hf_model_dir), "device": "cpu", "shard_size": 64})
    run_local(spec, WorkerContext(Settings()))
    keys, vectors = read_embeddings(spec.output, "cls")
    unit = semdedup.unit_rows(vectors)
    return {"root": root, "emb": spec.output, "chains": chains, "keys": keys, "index": {k: i for i, k in enumerate(keys)},
            "unit": unit, "cosine": unit @ unit.T}


def dedup(embedded: dict, name: str, **options) -> str:
    spec = parse_spec({"kind": "dedup", "embeddings": embedded["emb"], "output": str(embedded["root"] / name),
                       "vectors_per_task": 100, "clusters": CLUSTERS, **options})
    run_vectors_local(spec, ObjectStore(Settings()))
    return spec.output


def job_rank(embedded: dict, output: str, rows: list[dict], keep: str) -> np.ndarray:
    """Each embedded row's place in the job's keep order: its cosine with its cluster's centroid
    (hard: farthest first; easy: nearest first), ties by key."""
    folder = join(output, success_record(output, ObjectStore(Settings())).job_dir)
    centroids = np.load(next((Path(folder[len("file://"):]) / "kmeans").glob("centroids-*.npy")))
    rank = np.zeros(len(embedded["keys"]))
    for row in rows:
        i = embedded["index"][row["key"]]
        rank[i] = float(embedded["unit"][i] @ centroids[row["cluster"]])
    return rank if keep == "hard" else -rank


def above(embedded: dict, a: str, b: str, eps: float) -> bool:
    return bool(embedded["cosine"][embedded["index"][a], embedded["index"][b]] >= np.float32(1 - eps))


def assert_both_invariants(embedded: dict, rows: list[dict], eps: float) -> None:
    """Every removed row's duplicate_of is kept and above the threshold; no two kept rows are above it."""
    kept = {r["key"] for r in rows if r["kept"]}
    for row in rows:
        if not row["kept"]:
            assert row["duplicate_of"] in kept, row
            assert above(embedded, row["key"], row["duplicate_of"], eps), row
            assert row["cosine"] >= np.float32(1 - eps) - 1e-5
    ids = [embedded["index"][key] for key in kept]
    among = embedded["cosine"][np.ix_(ids, ids)]
    np.fill_diagonal(among, -1)
    assert among.max(initial=-1) < np.float32(1 - eps), "two kept rows are above the threshold"


@pytest.mark.parametrize("eps", [0.0005, 0.005])
@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_removed_rows_equal_a_brute_force_greedy_pass_over_the_whole_set(embedded, eps, keep):
    """The reference walks every row in the job's order and removes it when a row kept before it is
    above the threshold, over all pairs; every cluster is probed, so precision and recall are 1.0."""
    output = dedup(embedded, f"greedy-{keep}-{eps}", eps=eps, keep=keep, cross_clusters=CLUSTERS - 1)
    rows = read_table(output).to_pylist()
    kept, _ = semdedup.greedy_reference(embedded["unit"], job_rank(embedded, output, rows, keep), embedded["keys"], eps)
    should = {key for key, k in zip(embedded["keys"], kept) if not k}
    removed = {r["key"] for r in rows if not r["kept"]}
    record = success_record(output, ObjectStore(Settings())).figures
    assert record["phases"]["across_clusters"]["pairs"] > 0, "the forced clusters parted some near-duplicates"
    assert len(should) > 0 and removed == should, (len(removed & should) / len(removed), len(removed & should) / len(should))
    assert_both_invariants(embedded, rows, eps)


@pytest.mark.parametrize("eps", [0.0005, 0.005])
def test_every_removed_row_has_a_kept_stand_in_and_no_kept_pair_is_above_the_threshold(embedded, eps):
    """The default options, clusters forced high: the chains' far ends are kept or stood in for by a kept row."""
    rows = read_table(dedup(embedded, f"default-{eps}", eps=eps)).to_pylist()
    assert sum(not r["kept"] for r in rows) > 0
    assert_both_invariants(embedded, rows, eps)


def test_nemos_rule_loses_a_chains_far_end_that_the_kept_rule_keeps(embedded):
    """--rule semdedup removes a row whose earlier match was itself removed: nothing kept stands for it."""
    eps = 0.0005
    nemo = read_table(dedup(embedded, "nemo", eps=eps, rule="semdedup")).to_pylist()
    kept = {r["key"] for r in nemo if r["kept"]}
    orphans = [r for r in nemo if not r["kept"] and not any(above(embedded, r["key"], k, eps) for k in kept)]
    assert orphans, "the chains hold a row only a removed row is near"
    assert all(r["duplicate_of"] not in kept for r in orphans)
    ours = read_table(dedup(embedded, "kept", eps=eps)).to_pylist()
    assert_both_invariants(embedded, ours, eps)


def test_the_record_counts_pairs_across_clusters_and_the_rows_each_phase_removed(embedded):
    output = dedup(embedded, "counts", eps=0.0005)
    record = success_record(output, ObjectStore(Settings())).figures
    rows = read_table(output).to_pylist()
    phases = record["phases"]
    assert record["rule"] == "kept" and phases["across_clusters"]["cross_clusters"] == 12
    assert phases["across_clusters"]["pairs"] > 0
    assert record["removed"] == sum(not r["kept"] for r in rows) == (
        phases["in_clusters"]["removed"] + phases["across_clusters"]["removed"] - phases["across_clusters"]["kept_again"])
    assert read_kept_keys(output) == [r["key"] for r in rows if r["kept"]]
    assert all(r["cosine"] is None for r in rows if r["kept"]), "a kept row's cosine is null under the kept rule"


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_a_cluster_split_over_max_cluster_size_loses_nothing_across_its_pieces(embedded, keep):
    """One cluster of every image, split into pieces of about 100 rows: the pairs across pieces are
    found and resolved with the rest, so the result is the greedy pass over the whole set (before, the
    pieces were never compared: a chain cut by the split kept both its halves)."""
    eps = 0.005
    output = dedup(embedded, f"pieces-{keep}", eps=eps, keep=keep, clusters=1, max_cluster_size=100)
    rows = read_table(output).to_pylist()
    assert len(rows) > 200 and {r["cluster"] for r in rows} == {0}
    kept, _ = semdedup.greedy_reference(embedded["unit"], job_rank(embedded, output, rows, keep), embedded["keys"], eps)
    assert {r["key"] for r in rows if not r["kept"]} == {key for key, k in zip(embedded["keys"], kept) if not k}
    assert_both_invariants(embedded, rows, eps)
