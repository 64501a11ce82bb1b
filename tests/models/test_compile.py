"""torch.compile in the shard path: a compiled (static-shape) model gets every batch at one size,
short ones padded and cut back to their own rows. (Compiling itself takes 20 s on two cores, so
the suite does not compile: `--compile` is opt-in; bench/RESULTS.md has its measurements.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from helpers_models import load_model

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import normalize_model_ref
from workers.compute import DeviceStage, first_rows
from workers.context import WorkerContext
from workers.decode.preprocess import Decoder
from workers.jobheads import for_job
from workers.stagetimes import StageTimes


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
