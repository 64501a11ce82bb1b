"""How a dedup or neighbors job is cut into shards, in phases (no torch, no faiss).

A job over vectors is one ledger job whose shards run in phases; a shard of a later phase
needs every shard of the phase before it committed:

    dedup      fit (1 shard: k-means on a seeded sample) -> assign (1 per embed part: nearest
               centroid, rows bucketed by cluster group, visits of near other clusters by theirs)
               -> pairs (1 per cluster group: the rule inside its clusters, the pairs with their
               visitors) -> manifest (1 shard: the pairs across clusters resolved, rows published)
    neighbors  exact: search (1 per block of queries: top-k against every indexed vector)
               approximate: index (1 shard: a faiss IVF-Flat index of every indexed vector, its
               nprobe tuned and its recall measured) -> search (1 per block of queries, on that index)

Submit enqueues the first phase only; the worker that commits the last shard of a phase
sends the next one (workers/vectortasks.py). A shard delivered before its phase is ready
(the reconciler re-sends pending shards whose message it cannot find) does nothing and
leaves the shard pending. The plan is written once into the job's folder at submit, like
the manifests of an image job, and read by every shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from orchestrator.constants import VECTOR_PLAN_FILE
from orchestrator.errors import SpecError
from orchestrator.inputs.vectorsource import VectorSource, resolve_vectors
from orchestrator.jobspec.vectorspecs import DedupSpec, NeighborsSpec
from orchestrator.store.storage import ObjectStore, join

MAX_DEFAULT_CLUSTERS = 50_000
# neighbors --mode auto: approximate from this many queries and query x indexed vector pairs up.
# On one process the index paid for itself (build and tune = queries x the per-query saving) from
# 4,100 to 10,900 queries at 20,000 to 300,000 384-d vectors; it is built by one task while exact
# blocks run on every worker, so auto waits for 20,000. Below 2e9 pairs exact takes under a minute
# of one process, and is exact (bench/neighbors.py; bench/RESULTS.md, "Tenth session").
AUTO_APPROXIMATE_PAIRS = 2_000_000_000
AUTO_APPROXIMATE_QUERIES = 20_000
SAMPLE_PER_CLUSTER = 64  # k-means sample: faiss warns below 39 per centroid


@dataclass(frozen=True)
class VectorPlan:
    """The source vectors and the phases: names and shard counts, in order."""

    kind: str
    source: VectorSource
    phases: tuple[tuple[str, int], ...]
    clusters: int = 0  # dedup
    groups: int = 0  # dedup: pairwise tasks; cluster c belongs to group c % groups
    sample_rows: int = 0  # dedup: the k-means sample
    queries: VectorSource | None = None  # neighbors
    query_blocks: tuple[tuple[int, int], ...] = ()  # neighbors: [start, stop) global query rows per shard
    approximate: bool = False  # neighbors

    @property
    def n_shards(self) -> int:
        return sum(count for _, count in self.phases)

    def phase_range(self, name: str) -> range:
        start = 0
        for phase, count in self.phases:
            if phase == name:
                return range(start, start + count)
            start += count
        raise KeyError(name)

    def phase(self, shard: int) -> tuple[str, int]:
        """(phase name, index of the shard within its phase)."""
        start = 0
        for phase, count in self.phases:
            if shard < start + count:
                return phase, shard - start
            start += count
        raise IndexError(f"shard {shard} is beyond the plan's {self.n_shards} shards")

    def needs(self, shard: int) -> range:
        """The shards that must have committed before `shard` may run: the whole previous phase."""
        name, _ = self.phase(shard)
        names = [phase for phase, _ in self.phases]
        at = names.index(name)
        return self.phase_range(names[at - 1]) if at else range(0)

    def follows(self, shard: int) -> range:
        """The phase after `shard`'s (empty for the last)."""
        names = [phase for phase, _ in self.phases]
        at = names.index(self.phase(shard)[0])
        return self.phase_range(names[at + 1]) if at + 1 < len(names) else range(0)

    def first(self) -> range:
        return self.phase_range(self.phases[0][0])

    @property
    def model_identity(self) -> None:
        """A vector job runs no model: nothing a later run's carry-over compares (kinds.Planned)."""
        return None

    def group_of(self, cluster: int) -> int:
        return cluster % self.groups

    def summary(self) -> dict:
        rows = self.source.rows if self.queries is None else self.queries.rows
        out = {"items": rows, "shards": self.n_shards, "vectors": self.source.rows,
               "embeddings_job": self.source.job_id, "phases": dict(self.phases)}
        if self.kind == "dedup":
            out |= {"clusters": self.clusters, "sample_rows": self.sample_rows}
        elif self.queries is None:
            raise ValueError(f"a {self.kind} plan has no query vectors: only a dedup plan may leave them out")
        else:
            out |= {"queries_job": self.queries.job_id, "approximate": self.approximate}
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source.to_json(), "phases": [list(p) for p in self.phases],
                "clusters": self.clusters, "groups": self.groups, "sample_rows": self.sample_rows,
                "queries": self.queries.to_json() if self.queries else None,
                "query_blocks": [list(b) for b in self.query_blocks], "approximate": self.approximate}

    @classmethod
    def from_json(cls, data: dict) -> VectorPlan:
        queries = VectorSource.from_json(data["queries"]) if data.get("queries") else None
        return cls(data["kind"], VectorSource.from_json(data["source"]), tuple(tuple(p) for p in data["phases"]),
                   data["clusters"], data["groups"], data["sample_rows"], queries,
                   tuple(tuple(b) for b in data["query_blocks"]), data["approximate"])

    def write(self, folder: str, store: ObjectStore) -> None:
        store.write(join(folder, VECTOR_PLAN_FILE), json.dumps(self.to_json()).encode())

    @classmethod
    def read(cls, folder: str, store: ObjectStore) -> VectorPlan:
        return cls.from_json(json.loads(store.read(join(folder, VECTOR_PLAN_FILE))))


def default_clusters(rows: int) -> int:
    return max(1, min(MAX_DEFAULT_CLUSTERS, round(math.sqrt(rows))))


def plan_dedup(spec: DedupSpec, store: ObjectStore) -> VectorPlan:
    source = resolve_vectors(spec.embeddings, spec.pooling, store)
    refuse_own_prefix(spec.output, source)
    rows = source.rows
    clusters = min(spec.clusters or default_clusters(rows), rows)
    groups = max(1, min(clusters, math.ceil(rows / spec.vectors_per_task)))
    wanted = math.ceil(spec.sample_fraction * rows) if spec.sample_fraction else SAMPLE_PER_CLUSTER * clusters
    sample_rows = min(rows, max(clusters, wanted))
    phases = (("fit", 1), ("assign", len(source.parts)), ("pairs", groups), ("manifest", 1))
    return VectorPlan("dedup", source, phases, clusters, groups, sample_rows)


def plan_neighbors(spec: NeighborsSpec, store: ObjectStore) -> VectorPlan:
    source = resolve_vectors(spec.embeddings, spec.pooling, store)
    queries = resolve_vectors(spec.queries, spec.pooling, store, option="--queries")
    refuse_own_prefix(spec.output, source)
    refuse_own_prefix(spec.output, queries)
    if queries.model_fingerprint != source.model_fingerprint:
        raise SpecError(f"--queries {spec.queries} and --embeddings {spec.embeddings} come from different models "
                        f"({queries.model_fingerprint[:16]} and {source.model_fingerprint[:16]}): their cosines mean "
                        "nothing; embed both with one model")
    total = queries.rows
    blocks = tuple((start, min(total, start + spec.queries_per_task)) for start in range(0, total, spec.queries_per_task))
    approximate = approximate_mode(spec.mode, total, source.rows)
    phases = (("index", 1), ("search", len(blocks))) if approximate else (("search", len(blocks)),)
    return VectorPlan("neighbors", source, phases, queries=queries, query_blocks=blocks, approximate=approximate)


def approximate_mode(mode: str, queries: int, vectors: int) -> bool:
    """Whether a neighbors job searches a faiss index: --mode approximate, or auto above the threshold."""
    if mode != "auto":
        return mode == "approximate"
    return queries >= AUTO_APPROXIMATE_QUERIES and queries * vectors >= AUTO_APPROXIMATE_PAIRS


def plan_vectors(spec: DedupSpec | NeighborsSpec, store: ObjectStore) -> VectorPlan:
    return plan_dedup(spec, store) if spec.kind == "dedup" else plan_neighbors(spec, store)


def refuse_own_prefix(output: str, source: VectorSource) -> None:
    """Writing a job into the embed output it reads would replace that output's _SUCCESS.json."""
    if output.rstrip("/") == source.output.rstrip("/"):
        raise SpecError(f"output {output} is the embed output the job reads: choose another output")
