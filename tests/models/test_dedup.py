"""dedup in-process on real images: skimage photos and faces and sklearn digits with planted
near-duplicates (JPEG qualities, resized, cropped, mirrored), embedded by a tiny fixed ViT, then
deduplicated through the job's own phases (fit, assign, pairs, manifest) and checked against
exact brute-force cosine in fp32 at the same threshold, and against NeMo Curator's algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_curation import write_set

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.vectorplan import plan_dedup
from orchestrator.inputs.vectorsource import comparable
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import (
    read_duplicate_pairs,
    read_embeddings,
    read_json,
    read_kept_keys,
    read_table,
    success_record,
)
from orchestrator.store.storage import ObjectStore, join
from workers.context import WorkerContext
from workers.curation import semdedup
from workers.inprocess import run_local, run_vectors_local

EPS = 0.01


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, hf_model_dir) -> dict:
    root = tmp_path_factory.mktemp("curation")
    planted = write_set(root / "images")
    spec = parse_spec({"kind": "embed", "input": str(root / "images"), "output": str(root / "emb"),
                       "model": str(hf_model_dir), "device": "cpu", "shard_size": 64, "pooling": "cls,mean"})
    run_local(spec, WorkerContext(Settings()))
    keys, vectors = read_embeddings(spec.output, "cls")
    unit = semdedup.unit_rows(vectors)
    return {"root": root, "emb": spec.output, "planted": planted, "keys": keys, "cosine": unit @ unit.T}


def dedup(embedded: dict, name: str, **options) -> str:
    spec = parse_spec({"kind": "dedup", "embeddings": embedded["emb"], "output": str(embedded["root"] / name),
                       "vectors_per_task": 100, **options})
    run_vectors_local(spec, ObjectStore(Settings()))
    return spec.output


@pytest.fixture(scope="module")
def deduped(embedded) -> str:
    return dedup(embedded, "dedup")


def brute_force_pairs(embedded: dict) -> set[tuple[int, int]]:
    rows, cols = np.nonzero(np.triu(embedded["cosine"] >= np.float32(1 - EPS), k=1))
    return set(zip(rows.tolist(), cols.tolist()))


def test_found_pairs_agree_with_brute_force_cosine_within_0_99_precision_and_recall(embedded, deduped):
    index = {key: i for i, key in enumerate(embedded["keys"])}
    found = read_duplicate_pairs(deduped)
    precise = [embedded["cosine"][index[a], index[b]] >= np.float32(1 - EPS) for a, b, _ in found]
    kept = {index[key] for key in read_kept_keys(deduped)}
    pairs = brute_force_pairs(embedded)
    resolved = [not (i in kept and j in kept) for i, j in pairs]  # at most one of the two survives
    assert len(found) >= len(embedded["planted"]) // 2 and len(pairs) > len(found)
    assert np.mean(precise) >= 0.99
    assert all(resolved)  # the kept set holds no pair above the threshold


def test_no_two_kept_vectors_are_above_the_threshold_in_the_whole_set(embedded, deduped):
    """Inside a cluster by construction; across clusters because the pairs there are resolved too."""
    index = {key: i for i, key in enumerate(embedded["keys"])}
    kept = [index[key] for key in read_kept_keys(deduped)]
    among_kept = embedded["cosine"][np.ix_(kept, kept)]
    np.fill_diagonal(among_kept, -1)
    assert among_kept.max(initial=-1) < np.float32(1 - EPS)


def test_planted_jpeg_requality_and_resize_duplicates_are_removed(embedded, deduped):
    kept = set(read_kept_keys(deduped))
    index = {key: i for i, key in enumerate(embedded["keys"])}
    for copy, original in embedded["planted"].items():
        if embedded["cosine"][index[copy], index[original]] >= 1 - EPS:
            assert not (copy in kept and original in kept), (copy, original)


def test_every_embedded_key_is_one_output_row_and_every_removed_one_names_a_kept_row(embedded, deduped):
    rows = read_table(deduped).to_pylist()
    kept = {r["key"] for r in rows if r["kept"]}
    assert sorted(r["key"] for r in rows) == sorted(embedded["keys"])
    for row in rows:
        assert (row["duplicate_of"] is None) == row["kept"]
        if not row["kept"]:
            assert row["cosine"] >= 1 - EPS and row["duplicate_of"] != row["key"] and row["duplicate_of"] in kept


def test_rule_semdedup_keeps_the_rows_nemo_curators_algorithm_keeps_on_the_same_clusters(embedded):
    nemo = dedup(embedded, "nemo", rule="semdedup")
    rows = read_table(nemo).to_pylist()
    index = {key: i for i, key in enumerate(embedded["keys"])}
    _, vectors = read_embeddings(embedded["emb"], "cls")
    unit = semdedup.unit_rows(vectors)
    record = success_record(nemo, ObjectStore(Settings()))
    assert record.figures["phases"]["across_clusters"] == {"cross_clusters": 0, "pairs": 0, "removed": 0,
                                                            "kept_again": 0}
    folder = join(nemo, record.job_dir)
    centroids = np.load(next((Path(folder[len("file://"):]) / "kmeans").glob("centroids-*.npy")))
    for cluster in {r["cluster"] for r in rows}:
        members = [r for r in rows if r["cluster"] == cluster]
        vecs = unit[[index[r["key"]] for r in members]]
        reference = semdedup.nemo_reference(vecs, vecs @ centroids[cluster], EPS, "hard")
        assert [r["kept"] for r in members] == reference.tolist()


def test_the_record_counts_kept_and_removed_per_cluster_and_lists_every_part(deduped):
    record = success_record(deduped, ObjectStore(Settings()))
    rows = read_table(deduped).to_pylist()
    counts = record.figures["clusters"]
    assert record.kind == "dedup" and record.items == len(rows)
    assert record.figures["kept"] == sum(r["kept"] for r in rows)
    assert record.figures["removed"] == sum(not r["kept"] for r in rows)
    for cluster, count in counts.items():
        members = [r for r in rows if r["cluster"] == int(cluster)]
        assert count == {"kept": sum(r["kept"] for r in members), "removed": sum(not r["kept"] for r in members)}
    names = [part.name for part in record.parts]
    assert any("/kmeans/centroids-" in n for n in names) and any("/assign/g-00001/" in n for n in names)
    assert all(len(part.sha256) == 64 for part in record.parts)


def test_the_kept_manifest_holds_the_kept_keys_as_keys_of_the_embed_input(embedded, deduped):
    record = success_record(deduped, ObjectStore(Settings()))
    manifest = [p for p in record.parts if p.name.endswith("/kept.jsonl")]
    text = ObjectStore(Settings()).read(join(deduped, manifest[0].name)).decode()
    assert [json.loads(line)["key"] for line in text.splitlines()] == read_kept_keys(deduped)
    assert record.figures["input"] == str(parse_spec({"kind": "embed", "input": str(embedded["root"] / "images"),
                                                       "output": "/x", "model": "/m"}).input)


def test_a_cluster_over_max_cluster_size_is_split_and_still_keeps_no_pair_above_the_threshold(embedded):
    output = dedup(embedded, "split", clusters=1, max_cluster_size=100)
    index = {key: i for i, key in enumerate(embedded["keys"])}
    found = read_duplicate_pairs(output)
    assert found and all(embedded["cosine"][index[a], index[b]] >= 1 - EPS for a, b, _ in found)
    assert {r["cluster"] for r in read_table(output).to_pylist()} == {0}


def test_keep_easy_keeps_rows_nearer_their_centroid_than_keep_hard(embedded, deduped):
    easy = dedup(embedded, "easy", keep="easy")
    assert len(read_kept_keys(easy)) > 0 and set(read_kept_keys(easy)) != set(read_kept_keys(deduped))


def test_patches_a_missing_array_and_a_classify_output_are_refused(embedded, tmp_path):
    with pytest.raises(SpecError, match="not one vector"):
        parse_spec({"kind": "dedup", "embeddings": embedded["emb"], "output": str(tmp_path / "o"), "pooling": "patches"})
    spec = parse_spec({"kind": "dedup", "embeddings": embedded["emb"], "output": str(tmp_path / "o"),
                       "pooling": "pooled"})
    with pytest.raises(SpecError, match="stored cls, mean, not pooled"):
        plan_dedup(spec, ObjectStore(Settings()))
    own = parse_spec({"kind": "dedup", "embeddings": embedded["emb"], "output": embedded["emb"]})
    with pytest.raises(SpecError, match="the embed output the job reads"):
        plan_dedup(own, ObjectStore(Settings()))
    with pytest.raises(SpecError, match="no succeeded job"):
        plan_dedup(parse_spec({"kind": "dedup", "embeddings": str(tmp_path), "output": str(tmp_path / "o")}),
                   ObjectStore(Settings()))


def test_vectors_of_several_models_or_normalizations_are_not_comparable():
    one = {"source": "cls_token", "normalized": False, "model_fingerprint": "a" * 64, "family": "hf", "dtype": "float16"}
    assert comparable([one, one], [], "cls", "x") == ("a" * 64, False)
    with pytest.raises(SpecError, match="2 different models"):
        comparable([one, {**one, "model_fingerprint": "b" * 64}], [], "cls", "x")
    with pytest.raises(SpecError, match="differ in normalized"):
        comparable([one, {**one, "normalized": True}], [], "cls", "x")
    with pytest.raises(SpecError, match="2 different models"):
        comparable([{}], ["a", "b"], "cls", "x")  # an older output: the record says


def test_a_job_folder_reads_that_job(embedded, tmp_path):
    record = success_record(embedded["emb"], ObjectStore(Settings()))
    spec = parse_spec({"kind": "dedup", "embeddings": join(embedded["emb"], record.job_dir) + "/",
                       "output": str(tmp_path / "o")})
    assert plan_dedup(spec, ObjectStore(Settings())).source.job_id == record.job_id
    assert read_json(ObjectStore(Settings()), join(embedded["emb"], "_SUCCESS.json"))["job_id"] == record.job_id


def test_exact_neighbors_equal_brute_force_cosine_top_k(embedded):
    spec = parse_spec({"kind": "neighbors", "embeddings": embedded["emb"], "queries": embedded["emb"],
                       "output": str(embedded["root"] / "nn"), "k": 5, "queries_per_task": 90})
    run_vectors_local(spec, ObjectStore(Settings()))
    rows = read_table(spec.output).to_pylist()
    cosine = embedded["cosine"]
    assert [r["key"] for r in rows] == embedded["keys"]
    index = {key: i for i, key in enumerate(embedded["keys"])}
    for i, row in enumerate(rows):
        expected = np.sort(cosine[i])[::-1][:5]
        assert np.allclose(row["cosines"], expected, atol=1e-5)
        assert np.allclose([cosine[i, index[key]] for key in row["neighbors"]], row["cosines"], atol=1e-5)


def test_classify_with_kept_by_reads_only_the_images_dedup_kept(embedded, deduped, hf_model_dir, tmp_path):
    """Curating in three commands: embed, dedup, then classify --kept-by the dedup output."""
    from orchestrator.published.results import read_kept_keys, read_table

    spec = parse_spec({"kind": "classify", "input": str(embedded["root"] / "images"), "output": str(tmp_path / "cls"),
                       "model": str(hf_model_dir), "device": "cpu", "top_k": 1, "kept_by": deduped})
    run_local(spec, WorkerContext(Settings()))
    kept = read_kept_keys(deduped)
    assert sorted(read_table(spec.output).column("key").to_pylist()) == sorted(kept)
    assert len(kept) < len(embedded["keys"])  # the planted copies were left out
    record = json.loads((tmp_path / "cls" / "_jobs").glob("*/_job.json").__next__().read_text())
    assert record["plan"]["not_kept_by_dedup"] == len(embedded["keys"]) - len(kept)


def test_kept_by_an_output_without_a_dedup_result_is_refused(embedded, hf_model_dir, tmp_path):
    spec = parse_spec({"kind": "classify", "input": str(embedded["root"] / "images"), "output": str(tmp_path / "c"),
                       "model": str(hf_model_dir), "device": "cpu", "top_k": 1, "kept_by": str(tmp_path / "none")})
    with pytest.raises(SpecError, match="run `vitbatch run dedup` first"):
        run_local(spec, WorkerContext(Settings()))
