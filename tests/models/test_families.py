"""The family matrix: classify, embed and attention for every ViT family, through the real loading code.

Each tiny model (tests/helpers_families.py) is saved as users save real ones and loaded
by workers.models.load inside run_local, the in-process shard path. What is checked is the
semantics that differ between families: how many prefix (CLS, distillation, register) tokens
come before the patches, whether token 0 is a CLS token, and what the `cls` embedding is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers_families import FAMILIES, build_family
from helpers_models import LABELS, load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.published.results import read_arrays, read_embeddings, read_table, success_record
from orchestrator.store.storage import ObjectStore, join
from workers.attention import AttentionHead, cls_to_patches
from workers.context import WorkerContext
from workers.inprocess import run_local

N_GOOD = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family-images")
    rng = np.random.default_rng(7)
    for i in range(N_GOOD):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "zz-empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def run(kind: str, images: Path, model: Path, out: Path, ctx: WorkerContext, **options) -> str:
    spec = parse_spec({"kind": kind, "input": str(images), "output": str(out), "model": str(model),
                       "device": "cpu", **options})
    run_local(spec, ctx)
    return spec.output


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_tokens(name, family_dirs):
    """The prefix count, CLS token and cls embedding each family has (Dinov2 with registers: 1 + 4)."""
    family = FAMILIES[name]
    model = load_model(normalize_model_ref(str(family_dirs(name))), device="cpu")
    assert (model.family.prefix_tokens, model.family.class_token, model.family.cls_source) == \
        (family.prefix, family.class_token, family.cls_source)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_jobs(name, family_dirs, images, tmp_path, ctx):
    family = FAMILIES[name]
    model_dir = family_dirs(name)
    store = ObjectStore(Settings())

    out = run("classify", images, model_dir, tmp_path / "classify", ctx, top_k=2)
    rows = read_table(out, store).to_pylist()
    assert len(rows) == N_GOOD + 1
    assert [r["key"] for r in rows if r["error"]] == ["zz-empty.jpg"]
    assert {r["label"] for r in rows if not r["error"]} <= set(LABELS)

    out = run("embed", images, model_dir, tmp_path / "embed", ctx, pooling="cls,mean,patches")
    keys, patches = read_embeddings(out, "patches", store)
    _, mean = read_embeddings(out, "mean", store)
    _, cls = read_embeddings(out, "cls", store)
    assert len(keys) == N_GOOD
    # Only the patch tokens: prefix and register tokens are not among them, nor in their mean.
    assert patches.shape[1] == family.grid[0] * family.grid[1]
    np.testing.assert_allclose(mean.astype(np.float32), patches.astype(np.float32).mean(axis=1), atol=3e-3)
    assert cls.shape == mean.shape
    record = success_record(out, store)
    index = pq.read_table(io.BytesIO(store.read(join(out, _index_name(record)))))
    assert index.schema.metadata[b"vitbatch.cls_source"].decode() == family.cls_source
    assert index.schema.metadata[b"vitbatch.prefix_tokens"].decode() == str(family.prefix)

    out = run("attention", images, model_dir, tmp_path / "attention", ctx, layers="0,-1", max_overlays=1)
    for array in ("layer0", "layer1", "rollout"):
        _, maps = read_arrays(out, array, store)
        assert maps.shape == (N_GOOD, *family.grid)
        np.testing.assert_allclose(maps.astype(np.float32).sum(axis=(1, 2)), 1.0, atol=5e-3)


def _index_name(record: dict) -> str:
    return next(p.name for p in record.parts if p.name.endswith(".parquet"))


@pytest.mark.parametrize("name", ["timm-no-class-token", "hf-dinov2-registers"])
def test_attention_map_semantics(name, family_dirs):
    """With a CLS token: the CLS query's row; without one: the mean over the patch queries' rows.
    Either way only patch columns, renormalized (registers dropped)."""
    family = FAMILIES[name]
    model = load_model(normalize_model_ref(str(family_dirs(name))), device="cpu", precision="fp32",
                       attn="eager")  # outside the device stage's autocast: fp32 weights
    head = AttentionHead(model, 0, layers=[-1], heads="mean", with_rollout=False, overlay_indices=set())
    pixels = torch.randn(2, 3, *model.input_size)
    with torch.inference_mode():
        got = head.forward(pixels)["layer1"]
        last = head.model.family.attentions(pixels)[-1]  # [B, heads, T, T]
    queries = last[:, :, family.prefix:, :].mean(dim=2) if not family.class_token else last[:, :, 0, :]
    expected = cls_to_patches(queries, family.prefix).mean(dim=1).reshape(2, *family.grid)
    torch.testing.assert_close(got, expected)
    assert last.shape[-1] == family.prefix + family.grid[0] * family.grid[1]
