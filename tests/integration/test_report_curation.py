"""The page of a dedup job shows its near-duplicate groups with the kept image first, and the page of
a neighbors job each sampled query with its matches, thumbnails read from the embed job's input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.report import SAMPLE_GROUPS, build_page, encode_thumbnail
from orchestrator.published.results import read_table
from orchestrator.store.storage import ObjectStore
from workers.context import WorkerContext
from workers.inprocess import run_local, run_vectors_local

N_DISTINCT = 12
COPIED = {"copy-of-03.png": "img-03.png", "copy-of-07.png": "img-07.png"}  # same bytes: cosine 1


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, hf_model_dir) -> str:
    root = tmp_path_factory.mktemp("report-curation")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(N_DISTINCT):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        (images / f"img-{i:02d}.png").write_bytes(buffer.getvalue())
    for copy, original in COPIED.items():
        (images / copy).write_bytes((images / original).read_bytes())
    spec = parse_spec({"kind": "embed", "input": str(images), "output": str(root / "emb"), "model": str(hf_model_dir),
                       "device": "cpu", "pooling": "cls"})
    run_local(spec, WorkerContext(Settings()))
    return spec.output


def cards_of(group_html: str) -> list[str]:
    return re.findall(r'<div class="card ([^"]*)">.*?<b>([^<]*)</b>', group_html)


def test_a_dedup_page_shows_each_group_kept_image_first_with_thumbnails(embedded, tmp_path):
    spec = parse_spec({"kind": "dedup", "embeddings": embedded, "output": str(tmp_path / "dedup")})
    run_vectors_local(spec, ObjectStore(Settings()))
    assert (tmp_path / "dedup" / "_report.html").exists(), "the publication writes the page"
    page = build_page(spec.output, ObjectStore(Settings()))
    removed: dict[str, set[str]] = {}
    for row in read_table(spec.output).to_pylist():
        if not row["kept"]:
            removed.setdefault(row["duplicate_of"], set()).add(row["key"])
    assert any(copy in keys or original in keys for copy, original in COPIED.items() for keys in removed.values())
    groups = re.findall(r'<div class="group">(.*?</div></div>)</div>', page)
    assert len(groups) == min(SAMPLE_GROUPS, len(removed)), page[:2000]
    for group in groups:
        (first_css, kept), *others = cards_of(group)
        assert first_css == "kept" and kept in removed, "each group begins with the row it kept"
        assert {key for _, key in others} == removed[kept] and all(css == "" for css, _ in others)
        assert group.count('<img class="thumb"') == 1 + len(others), "a thumbnail for each image of the group"


def test_a_neighbors_page_shows_queries_with_their_matches(embedded, tmp_path):
    spec = parse_spec({"kind": "neighbors", "embeddings": embedded, "queries": embedded, "k": 3,
                       "output": str(tmp_path / "nn")})
    run_vectors_local(spec, ObjectStore(Settings()))
    page = build_page(spec.output, ObjectStore(Settings()))
    groups = re.findall(r'<div class="group">(.*?</div></div>)</div>', page)
    assert len(groups) == SAMPLE_GROUPS
    for group in groups:
        (query_css, query), *matches = cards_of(group)
        assert query_css == "kept" and len(matches) == 3
        assert query in [key for _, key in matches] or query in COPIED or query in COPIED.values(), \
            "a vector's nearest row is itself (or its byte-identical copy)"
        assert group.count('<img class="thumb"') == 4


def test_an_attention_page_shows_each_sampled_row_with_its_overlay(embedded, tmp_path, hf_model_dir):
    images = embedded.replace("file://", "").rsplit("/", 1)[0] + "/images"
    spec = parse_spec({"kind": "attention", "input": images, "output": str(tmp_path / "attn"),
                       "model": str(hf_model_dir), "device": "cpu", "max_overlays": 5})
    run_local(spec, WorkerContext(Settings()))
    page = build_page(spec.output, ObjectStore(Settings()))
    cards = re.findall(r'<div class="card ">(.*?)</div></div>', page)
    assert len(cards) == N_DISTINCT + len(COPIED)
    with_overlay = [row for row in read_table(spec.output).to_pylist() if row["overlay"]]
    assert len(with_overlay) == 5
    assert page.count('<img class="thumb"') == N_DISTINCT + len(COPIED), "overlays where written, images elsewhere"
    output = tmp_path / "attn"
    for row in with_overlay:
        [card] = [card for card in cards if f"<b>{row['key']}</b>" in card]
        assert encode_thumbnail((output / row["overlay"]).read_bytes()) in card, "the card shows the overlay"
