"""neighbors in-process on 20,000 indexed vectors (written as an embed job's output, no model):
exact equals numpy brute force; approximate (a faiss IVF-Flat index built once per job) finds
>= 0.9 of the exact top-10 and records the recall@k that a recomputation from its rows gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_curation import clustered_vectors, write_vectors

from orchestrator.config import Settings
from orchestrator.inputs.vectorplan import approximate_mode, plan_neighbors
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from orchestrator.store.storage import ObjectStore, join, normalize_uri
from workers.curation import knn, semdedup
from workers.curation.neighborshards import recall_rows
from workers.inprocess import run_vectors_local

K = 10
STORE = ObjectStore(Settings())
INDEXED, QUERIES = 20_000, 1_000


def record_of(output: str) -> dict:
    return json.loads(STORE.read(join(normalize_uri(output), "_SUCCESS.json")))


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("neighbors")
    data = clustered_vectors(INDEXED + QUERIES, 64, seed=3)
    indexed, queries = data[:INDEXED], data[INDEXED:]
    index_keys = write_vectors(str(root / "emb"), indexed, part_rows=3_000, name="i")
    query_keys = write_vectors(str(root / "queries"), queries, part_rows=300, name="q")
    cosine = semdedup.unit_rows(queries) @ semdedup.unit_rows(indexed).T  # [1000, 20000] fp32: numpy's brute force
    best = np.argpartition(-cosine, K, axis=1)[:, :K]
    best = np.take_along_axis(best, np.lexsort((best, -np.take_along_axis(cosine, best, 1)), axis=1), 1)
    return {"root": root, "index_keys": index_keys, "query_keys": query_keys, "cosine": cosine, "best": best,
            "expected": np.take_along_axis(cosine, best, 1)}


def neighbors(vectors: dict, name: str, **options) -> str:
    spec = parse_spec({"kind": "neighbors", "embeddings": str(vectors["root"] / "emb"),
                       "queries": str(vectors["root"] / "queries"), "output": str(vectors["root"] / name),
                       "k": K, "queries_per_task": 400, **options})
    run_vectors_local(spec, STORE)
    return spec.output


def found(vectors: dict, output: str) -> tuple[list[dict], np.ndarray]:
    """The output rows (in query order) and the brute-force cosine of every neighbour they name."""
    rows = read_table(output, STORE).to_pylist()
    assert [r["key"] for r in rows] == vectors["query_keys"]
    at = {key: i for i, key in enumerate(vectors["index_keys"])}
    ids = np.array([[at[key] for key in r["neighbors"]] for r in rows])
    return rows, np.take_along_axis(vectors["cosine"], ids, 1)


def test_exact_neighbors_equal_numpy_brute_force_and_the_record_says_exact(vectors):
    output = neighbors(vectors, "exact", mode="exact")
    rows, cosines = found(vectors, output)
    expected, keys = vectors["expected"], np.array(vectors["index_keys"])
    assert np.allclose([r["cosines"] for r in rows], expected, atol=1e-6)
    same = np.array([r["neighbors"] for r in rows]) == keys[vectors["best"]]
    assert (same | (np.abs(cosines - expected) <= 1e-6)).all()  # other keys only where cosines tie to 1e-6
    assert all(len(set(r["neighbors"])) == K for r in rows)
    record = record_of(output)
    assert record["neighbors"] == {"mode": "exact", "k": K}
    assert not [p for p in record["parts"] if "/index/" in p["name"]]


def test_approximate_neighbors_find_the_exact_top_k_and_record_their_recall(vectors):
    output = neighbors(vectors, "approximate", mode="approximate")
    rows, cosines = found(vectors, output)
    got = np.array([r["cosines"] for r in rows])
    assert np.allclose(got, cosines, atol=1e-5)  # an IVF-Flat cosine is the pair's exact cosine
    assert (np.diff(got, axis=1) <= 1e-7).all()  # best first
    exact = vectors["expected"]
    assert knn.recall_at_k(got, exact, K) >= 0.9
    summary = record_of(output)["neighbors"]
    sample = recall_rows(QUERIES, seed=0)
    assert summary["mode"] == "approximate" and summary["recall_sample"] == len(sample) == 256
    assert summary["recall_at_k"] == pytest.approx(knn.recall_at_k(got[sample], exact[sample], K), abs=1e-4)
    assert summary["recall_at_k"] >= summary["tuned_recall_at_k"] - 0.05 and summary["indexed"] == INDEXED
    lists = knn.lists_for(INDEXED)
    assert summary["index"] == f"IVF{lists},Flat" and summary["nprobe"] < lists  # it did skip lists
    names = [p["name"] for p in record_of(output)["parts"]]
    assert len([n for n in names if n.endswith(".faiss")]) == 1 and len([n for n in names if n.endswith(".arrow")]) == 1


def test_auto_is_exact_for_small_jobs_and_approximate_above_the_threshold(vectors, tmp_path):
    spec = parse_spec({"kind": "neighbors", "embeddings": str(vectors["root"] / "emb"),
                       "queries": str(vectors["root"] / "queries"), "output": str(tmp_path / "o")})
    plan = plan_neighbors(spec, STORE)
    assert not plan.approximate and plan.phases == (("search", 1),)
    forced = plan_neighbors(spec.model_copy(update={"mode": "approximate", "queries_per_task": 300}), STORE)
    assert forced.approximate and forced.phases == (("index", 1), ("search", 4))
    assert forced.needs(1) == range(1) and forced.summary()["approximate"]
    assert not approximate_mode("auto", 1_000, 1_000_000) and not approximate_mode("auto", 50_000, 20_000)
    assert approximate_mode("auto", 100_000, 1_000_000) and approximate_mode("auto", 1_000_000, 1_000_000)
    assert not approximate_mode("exact", 1_000_000, 1_000_000)


def test_auto_declines_an_index_that_scans_most_of_its_lists_and_searches_exactly(tmp_path, monkeypatch):
    """Uniform random directions (no clusters): the recall target needs most lists, so an index is no
    faster than exact; auto (here with its thresholds at 1) writes none and the blocks search exactly."""
    import orchestrator.inputs.vectorplan as vectorplan

    monkeypatch.setattr(vectorplan, "AUTO_APPROXIMATE_QUERIES", 1)
    monkeypatch.setattr(vectorplan, "AUTO_APPROXIMATE_PAIRS", 1)
    data = np.random.default_rng(4).standard_normal((INDEXED + 300, 64)).astype(np.float16)
    index_keys = write_vectors(str(tmp_path / "emb"), data[:INDEXED], part_rows=5_000, name="i")
    write_vectors(str(tmp_path / "queries"), data[INDEXED:], part_rows=300, name="q")
    spec = parse_spec({"kind": "neighbors", "embeddings": str(tmp_path / "emb"), "queries": str(tmp_path / "queries"),
                       "output": str(tmp_path / "nn"), "k": K})
    run_vectors_local(spec, STORE)
    record = record_of(spec.output)
    declined = record["neighbors"].pop("index_declined")
    assert record["neighbors"] == {"mode": "exact", "k": K} and record["shards"] == 2
    assert declined["nprobe"] > knn.lists_for(INDEXED) / 16
    assert not [p for p in record["parts"] if "/index/" in p["name"]]
    cosine = semdedup.unit_rows(data[INDEXED:]) @ semdedup.unit_rows(data[:INDEXED]).T
    at = {key: i for i, key in enumerate(index_keys)}
    rows = read_table(spec.output, STORE).to_pylist()
    named = np.take_along_axis(cosine, np.array([[at[key] for key in r["neighbors"]] for r in rows]), 1)
    assert np.allclose(named, np.sort(cosine, axis=1)[:, ::-1][:, :K], atol=1e-6)
