"""A loaded model, as every head, the pipeline and the device stage take it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.decode.preprocess import Preprocess
from workers.families import Family

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class LoadedModel:
    ref: str
    family: Family  # the adapter bound to `module`: what heads, attention, export and training ask
    module: Any  # what the device stage calls: a torch Module (torch.compile'd where asked); ONNX: an OrtModule
    prep: Preprocess
    id2label: dict[int, str]  # empty where the checkpoint has no trained classifier
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    static_batch: bool = False  # torch.compile'd with static shapes: every batch is padded to one size (compute.py)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # one forward at a time
    text_cache: dict = field(default_factory=dict, repr=False, compare=False)  # zero-shot prompts -> embeddings

    @property
    def input_size(self) -> tuple[int, int]:
        return self.prep.input_size

    @property
    def compute(self) -> str:
        """How this worker computes the outputs, for the shard's marker and the job's record:
        `auto` resolves per host, so one job's shards can differ (bf16 on an AMX host, fp32 on
        an AVX2 one, fp16 on a GPU)."""
        if hasattr(self.module, "execution_provider"):
            return f"onnxruntime {self.module.execution_provider}"
        precision = PRECISION_NAMES[self.dtype]
        autocast = self.device.type == "cpu" and precision != "fp32"  # over fp32 weights (workers.compute)
        return (f"{self.device.type} {precision}" + (" autocast" if autocast else "")
                + (" compiled" if self.static_batch else ""))
