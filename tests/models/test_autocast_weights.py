"""A CPU model loaded for bf16 stores its linear and conv weights in bf16 once (workers.loaded):
its outputs under the device stage's autocast are bit for bit those of fp32 weights cast per call."""

from __future__ import annotations

import pytest
import torch
from helpers_models import load_model

from orchestrator.jobspec.modelrefs import normalize_model_ref
from workers.loaded import LoadedModel

LOWERED = (torch.nn.Linear, torch.nn.Conv2d)  # what autocast runs in bf16, args cast: ViTs' layers


def _logits(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as workers.compute runs it
        return model.family.logits(pixels).float()


@pytest.mark.parametrize("fixture", ["hf_model_dir", "timm_model_dir"])
def test_bf16_weights_stored_once_give_the_autocast_outputs_exactly(fixture, request):
    ref = normalize_model_ref(str(request.getfixturevalue(fixture)))
    stored = load_model(ref, device="cpu", precision="bf16")
    cast_per_call = load_model(ref, device="cpu", precision="fp32")  # fp32 weights, cast by autocast
    lowered = [m for m in stored.module.modules() if isinstance(m, LOWERED)]
    assert lowered and all(p.dtype == torch.bfloat16 for m in lowered for p in m.parameters())
    norms = [m for m in stored.module.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # autocast runs them fp32
    assert stored.fingerprint == cast_per_call.fingerprint  # the checkpoint's own weights, before the cast
    pixels = torch.randn(3, 3, *stored.input_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(stored, pixels), _logits(cast_per_call, pixels))


def test_fp32_weights_stay_fp32(hf_model_dir):
    model = load_model(normalize_model_ref(str(hf_model_dir)), device="cpu", precision="fp32")
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
