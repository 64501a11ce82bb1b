"""Session-wide tiny models: built once, read-only for every test that loads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_models import build_hf_vit, build_timm_vit


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    return build_hf_vit(tmp_path_factory.mktemp("hf-vit"))


@pytest.fixture(scope="session")
def timm_model_dir(tmp_path_factory) -> Path:
    return build_timm_vit(tmp_path_factory.mktemp("timm-vit"))
