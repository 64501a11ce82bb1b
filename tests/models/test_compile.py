"""torch.compile in the shard path: a compiled (static-shape) model gets every batch at one size,
short ones padded, and gives the same top-1 as the eager model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers_models import load_model
from PIL import Image
from sklearn.datasets import load_digits

from orchestrator.config import Settings
from orchestrator.jobs import normalize_model_ref, parse_spec
from orchestrator.manifest import write_manifests
from orchestrator.planner import plan
from orchestrator.storage import ObjectStore
from workers.compute import DeviceStage, first_rows
from workers.context import WorkerContext
from workers.decode.preprocess import Decoder
from workers.heads import for_job
from workers.runner import run_shard
from workers.stagetimes import StageTimes


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """45 of scikit-learn's digits as PNGs, upscaled to 32 px: with batch 8, the last batch has 5."""
    folder = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(45):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{i:03d}.png")
    return folder


def _spec(kind: str, model_dir: Path, tmp_path: Path, **options):
    return parse_spec({"kind": kind, "input": str(tmp_path), "output": str(tmp_path / "out"),
                       "model": str(model_dir), "device": "cpu", **options})


def test_compile_gives_a_static_batch_model_that_says_so_and_the_default_stays_eager(hf_model_dir, tmp_path):
    ctx = WorkerContext(Settings(model_cache_dir=str(tmp_path / "cache")))
    classify = _spec("classify", hf_model_dir, tmp_path)
    assert classify.compile is False
    eager = for_job(classify, 0, ctx).model
    assert not eager.static_batch and "compiled" not in eager.compute
    compiled = for_job(classify.model_copy(update={"compile": True}), 0, ctx).model
    assert compiled.static_batch and compiled.compute.endswith(" compiled")


def test_a_static_batch_model_gets_a_short_batch_padded_and_only_its_own_rows_back(hf_model_dir):
    eager = load_model(normalize_model_ref(str(hf_model_dir)), device="cpu", precision="fp32")
    static = dataclasses.replace(eager, static_batch=True)
    seen: list[int] = []

    def forward(pixels: torch.Tensor):
        seen.append(pixels.shape[0])
        logits = eager.family.logits(pixels)
        return logits, {"logits": logits, "weights": eager.family.module.classifier.weight}

    pixels = torch.randn(3, 3, *eager.input_size)
    plain = DeviceStage(eager, Decoder(eager.prep, 10_000_000), 8, StageTimes()).compute(forward, pixels)
    padded = DeviceStage(static, Decoder(static.prep, 10_000_000), 8, StageTimes()).compute(forward, pixels)
    assert seen == [3, 8]  # the short batch went to the model at the size it is compiled for
    assert padded[0].shape[0] == padded[1]["logits"].shape[0] == 3
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-4, atol=1e-4)
    assert padded[1]["weights"].shape == plain[1]["weights"].shape  # not a batch: left whole
    assert first_rows([torch.zeros(8, 2), 5], 3, 8)[0].shape == (3, 2)


def _labels(model_dir: Path, images: Path, tmp_path: Path, **options) -> tuple[dict, dict, dict]:
    spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / f"out-{options['compile']}"),
                       "model": str(model_dir), "device": "cpu", "batch_size": 8, "top_k": 2, **options})
    store = ObjectStore(Settings())
    write_manifests(plan(spec.input, spec.shard_size, store), spec.output, store)
    marker = run_shard(spec, 0, WorkerContext(Settings(model_cache_dir=str(tmp_path / "cache"))))
    table = pq.read_table(Path(spec.output.removeprefix("file://")) / next(iter(marker.parts))).to_pylist()
    return ({r["key"]: r["label_id"] for r in table}, {r["key"]: r["topk_scores"] for r in table},
            {"batch_size": marker.batch_size, "rows": marker.rows, "errors": marker.errors})


def test_compiled_top_1_agrees_with_eager_on_every_decisive_image(hf_model_dir, digits_dir, tmp_path):
    eager, eager_scores, eager_run = _labels(hf_model_dir, digits_dir, tmp_path, compile=False)
    compiled, _, compiled_run = _labels(hf_model_dir, digits_dir, tmp_path, compile=True)
    assert eager_run == compiled_run == {"batch_size": 8, "rows": 45, "errors": 0}
    decisive = [k for k, scores in eager_scores.items() if scores[0] - scores[1] > 0.05]
    assert len(decisive) >= 30, eager_scores
    agree = sum(compiled[k] == eager[k] for k in decisive) / len(decisive)
    assert agree >= 0.995, (agree, {k: (eager[k], compiled[k]) for k in decisive if compiled[k] != eager[k]})
