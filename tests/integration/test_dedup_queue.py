"""dedup through the queue: CLI -> Redis -> a real worker -> S3-compatible server, phase by phase
(fit, assign per embed part, pairs per cluster group, manifest); every removed row names a kept row."""

from __future__ import annotations

import pytest
from helpers_curation import write_set

from orchestrator.published.results import read_duplicate_pairs, read_kept_keys, read_table, success_record
from orchestrator.store.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, bucket, upload, tiny_model, workers, cli):
    local = tmp_path_factory.mktemp("dedup-images")
    write_set(local, every=6)
    upload(local, bucket, "inputs/dedup-images")
    upload(tiny_model, bucket, "models/dedup-tiny-vit")
    workers.start("wd1")
    out = f"s3://{bucket}/out/dedup-emb/"
    done = cli(["run", "embed", "--input", f"s3://{bucket}/inputs/dedup-images/", "--output", out, "--model",
                f"s3://{bucket}/models/dedup-tiny-vit/", "--shard-size", "60", "--batch-size", "16"])
    assert done.returncode == 0, done.stderr
    return out


def test_a_dedup_job_runs_its_phases_on_workers_and_publishes_once(embedded, bucket, cli, settings):
    out = f"s3://{bucket}/out/dedup/"
    done = cli(["run", "dedup", "--embeddings", embedded, "--output", out, "--vectors-per-task", "80"])
    assert done.returncode == 0, done.stderr
    store = ObjectStore(settings)
    record = success_record(out, store)
    rows = read_table(out, store).to_pylist()
    assert record.kind == "dedup" and record.shards > 4  # fit, assign per embed part, pairs, manifest
    assert len(rows) == len({r["key"] for r in rows}) == record.items
    assert record.figures["kept"] == len(read_kept_keys(out, store))
    assert record.figures["removed"] == len(read_duplicate_pairs(out, store)) > 0
    kept = set(read_kept_keys(out, store))
    assert all(cosine >= 0.99 and of in kept for _, of, cosine in read_duplicate_pairs(out, store))
    phases = record.figures["phases"]  # the pairs tasks found pairs across clusters, the manifest resolved them
    assert record.figures["rule"] == "kept" and phases["across_clusters"]["cross_clusters"] == 12
    assert record.figures["removed"] == (phases["in_clusters"]["removed"] + phases["across_clusters"]["removed"]
                                          - phases["across_clusters"]["kept_again"])
    assert any("/visit/g-" in part.name for part in record.parts), "rows visited near other clusters"
