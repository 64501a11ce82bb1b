"""ONNX export of models without a trained classifier: ViT/MAE backbones, CLIP and SigLIP.

Their graph has no logits: it returns the embeddings (`pooled` too where the family has one),
its config.json says `"classifier": false`, and the parity check is on `cls`. The PyTorch
reference is always fp32 (`auto` is bf16 on AMX / AVX512-BF16 CPUs; the ONNX graph is fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_checkpoints import build_checkpoint
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.constants import EXPORT_REPORT_FILE
from orchestrator.errors import SpecError
from orchestrator.jobspec.checks.models import check_model_options
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelkinds import checkpoint_kind
from orchestrator.jobspec.modelrefs import normalize_model_ref, read_config
from orchestrator.published.results import read_embeddings
from orchestrator.store.storage import ObjectStore
from workers.context import WorkerContext
from workers.errors import ExportFailed, ModelLoadError
from workers.families import HFBackbone
from workers.heads import ClassifyHead
from workers.inprocess import run_local
from workers.onnx.export import RANDOM_OPS, export
from workers.onnx.parity import AGREE_COSINE, check_parity
from workers.onnx.runtime import session

N_IMAGES = 6
HEADLESS = ["vit-model", "clip-model", "siglip-model"]
POOLED = {"clip-model", "siglip-model"}  # families with a pooled output apart from `cls`
CLS_SOURCE = {"vit-model": "cls_token", "clip-model": "projected", "siglip-model": "pooled"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx-family-images")
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        coarse = rng.integers(0, 256, (3 + i % 3, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((48 + 8 * i, 40), Image.BICUBIC).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images, ctx):
    """(source dir, exported dir, report) per (checkpoint, quantize), exported once."""
    cache: dict = {}

    def get(name: str, quantize: str = "none"):
        if (name, quantize) not in cache:
            source = cache.get(name) or build_checkpoint(name, tmp_path_factory.mktemp(name))
            cache[name] = source
            out = tmp_path_factory.mktemp(f"{name}-{quantize}-onnx")
            spec = parse_spec({"kind": "export", "model": str(source), "output": str(out), "input": str(images),
                               "quantize": quantize, "int8_min_agreement": 0.0, "device": "cpu"})
            export(spec, "job-test", ctx)
            cache[(name, quantize)] = (source, out, json.loads((out / EXPORT_REPORT_FILE).read_text()))
        return cache[(name, quantize)]

    return get


@pytest.mark.parametrize("name", HEADLESS)
def test_a_headless_export_passes_its_parity_check_on_cls(name, exported):
    _, out, report = exported(name)
    fp32 = report["parity"]["fp32"]
    assert report["passed"] and report["failure"] is None
    assert "max_abs_logit_diff" not in fp32 and fp32["max_abs_cls_diff_relative"] < 1e-4
    assert fp32["cls_cosine_min"] > 0.9999 and fp32["cls_agreement"] == 1.0 and fp32["images"] == N_IMAGES
    assert report["thresholds"]["agree_cosine"] == AGREE_COSINE
    names = ["cls_embedding", *(["pooled_embedding"] if name in POOLED else []), "mean_embedding", "patch_embeddings"]
    assert [o["name"] for o in report["outputs"]] == names
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == names  # no logits
    config = json.loads((out / "config.json").read_text())
    assert config["classifier"] is False and config["id2label"] == {}
    assert list(config["outputs"].values()) == names and config["cls_source"] == CLS_SOURCE[name]
    assert checkpoint_kind(str(out), config).classifier is False


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("name", HEADLESS)
def test_ort_embeddings_match_pytorch_fp32(name, exported, images, tmp_path, ctx):
    source, onnx_dir, _ = exported(name)
    pooling = ["cls", "mean", *(["pooled"] if name in POOLED else [])]
    outputs = {}
    for label, model in (("torch", source), ("onnx", onnx_dir)):
        spec = parse_spec({"kind": "embed", "input": str(images), "output": str(tmp_path / label), "model": str(model),
                           "device": "cpu", "precision": "fp32", "pooling": ",".join(pooling)})
        run_local(spec, ctx)
        outputs[label] = spec.output
    for array in pooling:
        keys_t, torch_values = read_embeddings(outputs["torch"], array, ObjectStore(Settings()))
        keys_o, onnx_values = read_embeddings(outputs["onnx"], array, ObjectStore(Settings()))
        assert keys_t == keys_o and len(keys_t) == N_IMAGES
        assert _cosines(onnx_values, torch_values).min() >= 0.9999, array


def test_classify_on_a_headless_export_is_refused_at_submit_and_on_the_worker(exported, images, tmp_path):
    _, onnx_dir, _ = exported("vit-model")
    store, ref = ObjectStore(Settings()), normalize_model_ref(str(onnx_dir))
    config = read_config(ref, store)
    common = {"input": str(images), "output": str(tmp_path / "x"), "model": ref}
    with pytest.raises(SpecError, match="classify would write a random head's labels"):
        check_model_options(parse_spec({"kind": "classify", **common}), config)
    with pytest.raises(SpecError, match="drop `pooled` from --pooling"):
        check_model_options(parse_spec({"kind": "embed", "pooling": "cls,pooled", **common}), config)
    check_model_options(parse_spec({"kind": "embed", "pooling": "cls,mean,patches", **common}), config)
    model = load_model(ref, device="cpu")
    assert not model.family.has_classifier and not model.family.has_pooled
    with pytest.raises(ModelLoadError, match="without a trained classifier"):
        ClassifyHead(model, 0, top_k=1)


def test_a_clip_export_answers_it_has_a_projected_cls_and_a_pooled_output(exported):
    _, onnx_dir, _ = exported("clip-model")
    family = load_model(normalize_model_ref(str(onnx_dir)), device="cpu").family
    assert family.has_pooled and not family.has_classifier and not family.zero_shot
    assert family.cls_source == "projected" and family.prefix_tokens == 1


def test_mae_exports_every_patch_in_place_without_random_numbers(exported, images):
    _, out, report = exported("vit-mae-model")
    assert report["passed"]
    # Random masking would permute the patch tokens (cls and mean would not show it): they match PyTorch's, in order.
    assert report["parity"]["fp32"]["max_abs_embedding_diff"]["patches"] < 1e-4
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not {node.op_type for node in graph.node} & RANDOM_OPS
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ort = session(out / "model.onnx")
    first, again = ort.run(["patch_embeddings"], {"pixel_values": pixels}), ort.run(["patch_embeddings"],
                                                                                    {"pixel_values": pixels})
    np.testing.assert_array_equal(first[0], again[0])


def test_an_export_whose_graph_draws_random_numbers_is_refused(exported, tmp_path, ctx, monkeypatch):
    """MAE without the identity noise the family passes masks (here: shuffles) its patches at random."""
    source, _, _ = exported("vit-mae-model")
    monkeypatch.setattr(HFBackbone, "_mae", property(lambda self: False))
    spec = parse_spec({"kind": "export", "model": str(source), "output": str(tmp_path / "out"), "samples": 2,
                       "device": "cpu"})
    with pytest.raises(ExportFailed, match="draws random numbers"):
        export(spec, "job-test", ctx)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_headless_int8_is_judged_on_cls_cosine_agreement(exported):
    _, _, report = exported("clip-model", "int8")
    int8 = report["parity"]["int8"]
    assert report["passed"] and set(report["parity"]) == {"fp32", "int8"}
    assert 0 < int8["max_abs_cls_diff"] and 0 < int8["cls_cosine_min"] <= int8["cls_cosine_mean"] <= 1.0 + 1e-9
    assert 0.0 <= int8["cls_agreement"] <= 1.0


def test_headless_parity_verdicts_say_what_differs():
    spec = parse_spec({"kind": "export", "model": "x", "output": "y", "fp32_tolerance": 1e-3,
                       "int8_min_agreement": 0.9})
    good = {"max_abs_cls_diff": 1e-6, "max_abs_cls_diff_relative": 1e-6, "cls_cosine_min": 1.0, "cls_cosine_mean": 1.0,
            "cls_agreement": 1.0, "images": 10, "max_abs_embedding_diff": {}}
    assert check_parity(spec, {"fp32": good, "int8": good}) is None
    far = {**good, "max_abs_cls_diff": 0.5, "max_abs_cls_diff_relative": 0.1}
    assert "fp32 ONNX cls embeddings differ from PyTorch" in check_parity(spec, {"fp32": far})
    split = {**good, "cls_agreement": 0.5, "cls_cosine_min": 0.93}
    assert "int8 cls embeddings agree with PyTorch fp32" in check_parity(spec, {"fp32": good, "int8": split})
