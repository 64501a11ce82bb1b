"""A loaded model, as every head, the pipeline and the device stage take it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.decode.preprocess import Preprocess
from workers.families import Family, HFDualEncoder

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The modules whose op CPU autocast runs in the lower precision with every argument cast to it
# (linear, conv): their weights stored in that precision give the very same outputs, uncast.
AUTOCAST_LOWERED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def store_autocast_weights(module: torch.nn.Module, family: Family, dtype: torch.dtype) -> int:
    """Store the weights and biases of `module`'s linear and conv layers in `dtype` once, for a
    model that runs under CPU autocast to `dtype` (workers.compute): autocast casts them to
    `dtype` on every call anyway, so the outputs are bit for bit the same, without a cast of
    every weight per batch (ViT-Tiny/16 in bf16 on a 2-core EPYC: 296 casts a forward, about 4%
    of it). Norms and embeddings stay fp32, as autocast computes them. A dual encoder is left
    as it is: its text tower runs outside autocast (heads.text_embeddings). Returns the count."""
    if isinstance(family, HFDualEncoder) or dtype == torch.float32:
        return 0
    lowered = [sub for sub in module.modules() if isinstance(sub, AUTOCAST_LOWERED)]
    for sub in lowered:
        sub.to(dtype)
    return len(lowered)


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
        autocast = self.device.type == "cpu" and precision != "fp32"  # workers.compute; store_autocast_weights
        return (f"{self.device.type} {precision}" + (" autocast" if autocast else "")
                + (" compiled" if self.static_batch else ""))
