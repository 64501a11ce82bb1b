"""--precision auto for training: by the CPU's features and the model's width, as measured."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from workers.training import precision

CPU = torch.device("cpu")


def vit(hidden: int) -> torch.nn.Module:
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=4 * hidden, num_labels=10))


@pytest.fixture
def cpu(monkeypatch):
    """Sets what the CPU has: cpu("avx2"), cpu("avx512_bf16") or cpu("amx")."""

    def have(kind: str) -> None:
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: kind in ("avx512_bf16", "amx"))
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: kind == "amx")

    return have


def test_the_width_is_the_hidden_size_of_a_vit_not_its_wider_mlp_layer():
    assert precision.model_width(vit(96)) == 96
    assert precision.model_width(vit(384)) == 384
    assert precision.model_width(torch.nn.Conv2d(3, 8, 3)) == 0


@pytest.mark.parametrize("hidden", [96, 384])
def test_an_avx2_only_cpu_trains_every_model_in_fp32(cpu, hidden):
    cpu("avx2")
    assert precision.resolve("auto", CPU, vit(hidden)) == "fp32"


def test_an_avx512_bf16_cpu_trains_a_wide_model_in_bf16_and_a_narrow_one_in_fp32(cpu):
    cpu("avx512_bf16")
    assert precision.resolve("auto", CPU, vit(384)) == "bf16"  # 2.1-2.7x faster per step there
    assert precision.resolve("auto", CPU, vit(96)) == "fp32"  # the demo's ViT: 1.5-2x slower in bf16


def test_an_amx_cpu_trains_in_bf16_whatever_the_width(cpu):
    cpu("amx")
    assert precision.resolve("auto", CPU, vit(96)) == "bf16"


@pytest.mark.parametrize("chosen", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept(cpu, chosen):
    cpu("avx512_bf16")
    assert precision.resolve(chosen, CPU, vit(96 if chosen == "bf16" else 384)) == chosen
