"""ONNX export jobs and ONNX Runtime models, in-process on the CPU.

The export function is the one the worker's task runs; classify and embed with the
exported directory go through run_local (the real shard path) and are compared with the
same jobs on the PyTorch model. Refusals are the submit-time checks Client.submit calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers_families import build_family
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.constants import EXPORT_REPORT_FILE
from orchestrator.errors import SpecError
from orchestrator.jobspec.checks.models import check_export, check_model_options
from orchestrator.jobspec.checks.training import check_finetune
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import normalize_model_ref, read_config
from orchestrator.published.results import read_embeddings, read_table
from orchestrator.store.storage import ObjectStore
from workers.attention import AttentionHead
from workers.context import WorkerContext
from workers.errors import ExportFailed, ModelLoadError
from workers.inprocess import run_local
from workers.onnx.export import export
from workers.onnx.runtime import session, worker_cores

N_GOOD = 12
DECISIVE = 0.05


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx-images")
    rng = np.random.default_rng(3)
    for i in range(N_GOOD):
        y, x = np.mgrid[0:48, 0:64]
        base = rng.integers(0, 256, 3)
        rgb = (base + np.stack([x * (i + 1), y * (9 - i % 9), (x + y) * 2], -1)) % 256
        Image.fromarray(rgb.astype(np.uint8)).save(root / f"img{i:02d}.jpg", quality=92)
    (root / "zz-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images, ctx):
    """(source dir, exported dir, report) per (family, quantize), exported once."""
    cache: dict = {}

    def get(name: str, quantize: str = "none"):
        if (name, quantize) not in cache:
            source = cache.get(name) or build_family(name, tmp_path_factory.mktemp(name))
            cache[name] = source
            out = tmp_path_factory.mktemp(f"{name}-{quantize}-onnx")
            spec = parse_spec({"kind": "export", "model": str(source), "output": str(out), "input": str(images),
                               "quantize": quantize, "int8_min_agreement": 0.0, "device": "cpu"})
            export(spec, "job-test", ctx)
            cache[(name, quantize)] = (source, out, json.loads((out / EXPORT_REPORT_FILE).read_text()))
        return cache[(name, quantize)]

    return get


@pytest.mark.parametrize("name", ["hf-vit", "timm-no-class-token", "hf-dinov2-registers"])
def test_export_parity_and_report(name, exported):
    _, out, report = exported(name)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", EXPORT_REPORT_FILE, "model.onnx"]
    fp32 = report["parity"]["fp32"]
    assert report["passed"] and report["opset"] == 18 and report["exporter"] == "torch.onnx.export(dynamo=True)"
    assert fp32["max_abs_logit_diff_relative"] < 1e-4 and fp32["top1_agreement"] == 1.0
    assert max(fp32["max_abs_embedding_diff"].values()) < 1e-3
    assert report["sample"]["kind"] == "input" and report["sample"]["images"] == N_GOOD
    assert list(report["sample"]["errors"]) == ["zz-broken.jpg"]
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(report["versions"])
    # A classifier's graph has the outputs it always had (a headless one's: tests/models/test_onnx_families.py)
    assert [o["name"] for o in report["outputs"]] == ["logits", "cls_embedding", "mean_embedding", "patch_embeddings"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    assert "LayerNormalization" in {node.op_type for node in graph.node}
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "onnx" and config["id2label"]["0"] == "cat"


def test_int8_report(exported):
    _, out, report = exported("timm-registers", "int8")
    int8 = report["parity"]["int8"]
    assert report["quantize"] == "int8" and set(report["parity"]) == {"fp32", "int8"}
    assert 0 < int8["max_abs_logit_diff"] and 0.0 <= int8["top1_agreement"] <= 1.0
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops


def _rows(out: str) -> dict[str, dict]:
    return {row["key"]: row for row in read_table(out, ObjectStore(Settings())).to_pylist()}


@pytest.mark.parametrize("name", ["hf-vit", "timm-no-class-token"])
def test_ort_classify_and_embed_match_pytorch(name, exported, images, tmp_path, ctx):
    source, onnx_dir, _ = exported(name)
    results = {}
    # The ONNX graph runs in fp32 (--precision does not apply to it): so must its PyTorch reference,
    # not `auto`, which is bf16 on AMX / AVX512-BF16 CPUs.
    for label, model in (("torch", source), ("onnx", onnx_dir)):
        common = {"input": str(images), "model": str(model), "device": "cpu", "precision": "fp32"}
        classify = parse_spec({"kind": "classify", "output": str(tmp_path / f"c-{label}"), "top_k": 2, **common})
        embed = parse_spec({"kind": "embed", "output": str(tmp_path / f"e-{label}"), "pooling": "cls,mean,patches",
                            **common})
        run_local(classify, ctx)
        run_local(embed, ctx)
        results[label] = (_rows(classify.output), embed.output)
    torch_rows, onnx_rows = results["torch"][0], results["onnx"][0]
    assert torch_rows.keys() == onnx_rows.keys()
    assert {k: r["error"] for k, r in torch_rows.items()} == {k: r["error"] for k, r in onnx_rows.items()}
    assert onnx_rows["zz-broken.jpg"]["error"] and onnx_rows["zz-broken.jpg"]["label"] is None
    decisive = [k for k, r in torch_rows.items() if r["error"] is None
                and r["topk_scores"][0] - r["topk_scores"][1] > DECISIVE]
    assert decisive
    assert [onnx_rows[k]["label"] for k in decisive] == [torch_rows[k]["label"] for k in decisive]
    for key in decisive:
        np.testing.assert_allclose(onnx_rows[key]["topk_scores"], torch_rows[key]["topk_scores"], atol=1e-4)
    for pooling in ("cls", "mean", "patches"):
        keys_t, torch_values = read_embeddings(results["torch"][1], pooling, ObjectStore(Settings()))
        keys_o, onnx_values = read_embeddings(results["onnx"][1], pooling, ObjectStore(Settings()))
        assert keys_t == keys_o
        np.testing.assert_allclose(onnx_values.astype(np.float32), torch_values.astype(np.float32), atol=2e-3)


def test_parity_failure_fails_the_job(exported, images, tmp_path, ctx):
    source, _, _ = exported("hf-vit")
    spec = parse_spec({"kind": "export", "model": str(source), "output": str(tmp_path / "out"), "samples": 8,
                       "fp32_tolerance": 1e-12, "device": "cpu"})
    with pytest.raises(ExportFailed, match="parity check failed: fp32 ONNX logits differ"):
        export(spec, "job-test", ctx)
    report = json.loads((tmp_path / "out" / EXPORT_REPORT_FILE).read_text())
    assert report["passed"] is False and report["sample"]["kind"] == "synthetic"
    assert not (tmp_path / "out" / "model.onnx").exists()  # no model is written for a failed check


def test_refusals_at_submit(exported, images, tmp_path):
    """Attention, fine-tuning and re-exporting an ONNX model are refused with the reason; embed patches is not."""
    _, onnx_dir, _ = exported("hf-vit")
    store, ref = ObjectStore(Settings()), normalize_model_ref(str(onnx_dir))
    config = read_config(ref, store)
    common = {"input": str(images), "output": str(tmp_path / "x"), "model": ref}
    with pytest.raises(SpecError, match="ONNX export: attention maps need the PyTorch model"):
        check_model_options(parse_spec({"kind": "attention", **common}), config)
    check_model_options(parse_spec({"kind": "embed", "pooling": "cls,mean,patches", **common}), config)
    check_model_options(parse_spec({"kind": "classify", **common}), config)
    finetune = parse_spec({"kind": "finetune", "train": str(images), "output": str(tmp_path / "f"), "model": ref})
    with pytest.raises(SpecError, match="fine-tuning starts from a PyTorch model only"):
        check_finetune(finetune, store)
    with pytest.raises(SpecError, match="export starts from a PyTorch model only"):
        check_export(parse_spec({"kind": "export", "model": ref, "output": str(tmp_path / "e")}), store)
    model = load_model(ref, device="cpu")
    with pytest.raises(ModelLoadError, match="ONNX export"):  # and on a worker, should a spec get there
        AttentionHead(model, 0, layers=[-1], heads="mean", with_rollout=True, overlay_indices=set())


def test_external_data_outside_the_folder_is_refused(exported, tmp_path):
    _, onnx_dir, _ = exported("hf-vit")
    graph = onnx.load(str(onnx_dir / "model.onnx"))
    tensor = graph.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../outside.bin")
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save(graph, str(bad / "model.onnx"))
    (bad / "config.json").write_text((onnx_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="outside its folder"):
        load_model(normalize_model_ref(str(bad)), device="cpu")


def test_an_onnx_model_names_onnxruntime_and_its_provider_as_its_compute(exported):
    _, out, _ = exported("hf-vit")
    assert load_model(normalize_model_ref(str(out)), device="cpu").compute == "onnxruntime CPUExecutionProvider"


def test_ort_runs_the_compute_threads_the_worker_was_given(exported):
    """The embedded stack gives each of N workers cores/N threads through OMP_NUM_THREADS, which ORT does not
    read: its session must take torch's number, or two workers on two cores run four threads. The tests run
    with OMP_NUM_THREADS=1 (tests/conftest.py) on a machine with more cores than that."""
    _, out, _ = exported("hf-vit")
    assert torch.get_num_threads() == 1 < worker_cores()
    assert session(out / "model.onnx").get_session_options().intra_op_num_threads == 1
