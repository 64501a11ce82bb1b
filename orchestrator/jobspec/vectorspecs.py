"""The vector jobs' specs: dedup and neighbors read an embed job's vectors instead of images, in
phases of shards (inputs/vectorplan.py) that workers/curation/vectorshards.py serves.

Every field has a description: it becomes the `--help` text and the JSON schema (`vitbatch schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from orchestrator.jobspec.specbase import BaseSpec, Lane, OutputPrefix, Pooling, checked_unless_unset
from orchestrator.store.storage import normalize_uri


class VectorJob(BaseSpec):
    """Options of the jobs that read an embed job's vectors instead of images."""

    embeddings: str = Field(description="An embed job's output prefix (its latest succeeded job) or one job's "
                            "folder (<output>/_jobs/<job id>/); only the parts its _SUCCESS.json lists are read.")
    output: OutputPrefix
    pooling: Pooling = Field("cls", description="Which stored array to compare: cls, pooled or mean (one vector "
                             "per image; patches are refused).")
    lane: Lane = Field(
        "auto", description="Queue lane; auto = interactive for small jobs, bulk otherwise.")

    @field_validator("embeddings", "queries", check_fields=False)
    @classmethod
    def _vectors(cls, value: str | None) -> str | None:
        return checked_unless_unset(normalize_uri, value)

    @field_validator("pooling")
    @classmethod
    def _one_vector(cls, value: str) -> str:
        if value == "patches":
            raise ValueError("patches are [tokens, hidden] per image, not one vector: compare cls, pooled or mean")
        return value


class DedupSpec(VectorJob):
    """Semantic deduplication (SemDeDup) of an embed job's vectors: k-means, then pairwise cosine inside each
    cluster and with the nearest other clusters; a row is removed when a kept row before it is >= 1 - eps."""

    kind: Literal["dedup"] = Field("dedup", description="Job kind: dedup.")
    eps: float = Field(0.01, gt=0, lt=1, description="Duplicates have cosine >= 1 - eps with a row kept before them.")
    clusters: int | None = Field(None, gt=0, le=1_000_000, description="k-means clusters; unset = sqrt(vectors), "
                                 "at most 50,000.")
    keep: Literal["hard", "easy", "random"] = Field(
        "hard", description="Which row of a near-duplicate group is kept: hard = farthest from its centroid (NeMo's "
        "default), easy = nearest, random = seeded.")
    sample_fraction: float | None = Field(None, gt=0, le=1, description="Share of the vectors k-means is fitted on "
                                          "(seeded); unset = 64 per cluster, at most all of them.")
    seed: int = Field(0, description="Seed of the k-means sample, its initialization and --keep random.")
    vectors_per_task: int = Field(200_000, gt=0, description="Vectors per pairwise task: clusters are grouped into "
                                  "about vectors / this many tasks.")
    max_cluster_size: int = Field(100_000, ge=100, description="A cluster larger than this is split by a second "
                                  "k-means level before its pairwise step (compute grows with its square).")
    rule: Literal["kept", "semdedup"] = Field(
        "kept", description="kept = a row is removed when a row KEPT before it is >= 1 - eps (its stand-in: no "
        "kept pair above the threshold, every removed row has a kept one above it), and pairs across clusters are "
        "resolved too; semdedup = NeMo Curator's rule: removed when any row before it in its cluster is >= 1 - eps "
        "(a chain A ~ B ~ C loses C), clusters never compared.")
    cross_clusters: int = Field(12, ge=0, le=16, description="rule kept: each row is also compared with the rows of "
                                "the other clusters whose centroid cosine is within 0.125 sqrt(2 eps) of its own "
                                "cluster's, at most this many, nearest first; 0 = inside clusters (and the pieces "
                                "of a split one) only.")


class NeighborsSpec(VectorJob):
    """The k nearest rows of --embeddings by cosine for every row of --queries (exact, or a faiss index above a size)."""

    kind: Literal["neighbors"] = Field("neighbors", description="Job kind: neighbors.")
    queries: str = Field(description="Another embed job's output prefix or job folder: one result row per vector.")
    k: int = Field(10, gt=0, le=1000, description="Neighbours kept per query.")
    mode: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="exact = blocked matrix products (one task per block of queries); approximate = one "
        "faiss IVF-Flat index of --embeddings, built once per job by its first task, searched by one task per block "
        "of queries (its recall@k, measured on a seeded sample, is in _SUCCESS.json); auto = approximate from "
        "20,000 queries and 2,000,000,000 query x vector pairs up (bench/neighbors.py), unless the index would scan "
        "over a sixteenth of its lists to reach --recall-target (vectors without clusters); exact otherwise.")
    queries_per_task: int = Field(20_000, gt=0, description="Query vectors per task.")
    recall_target: float = Field(0.95, gt=0, le=1, description="approximate: the index scans the fewest lists "
                                 "(a power of two) whose recall@k on a seeded sample of queries reaches this.")
    seed: int = Field(0, description="approximate: seed of the index's k-means sample and of the query samples "
                      "its nprobe is tuned and its recall measured on.")


VectorSpec = DedupSpec | NeighborsSpec  # the kinds planned into phases of vector shards
