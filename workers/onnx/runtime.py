"""Exported ONNX model directories, run on ONNX Runtime behind the LoadedModel that every head takes.

The directory an export job writes (workers/onnx/export.py) holds `model.onnx` and a
config.json with `"format": "onnx"`, the source model's preprocessing and labels, and
what the graph's outputs mean (`cls_source`, `prefix_tokens`, `outputs`). Its graph has one
input (`pixel_values`, normalized like the source model's, any batch size) and the outputs
config.json lists: logits (only where the source had a trained classifier; a headless
export says `"classifier": false`), the `cls` embedding, `pooled` (where the source has one
apart from `cls`: CLIP, timm image projections), `mean` and the patch tokens, so classify,
evaluate and embed read their results from one ORT run and the pipeline stays the one
PyTorch models use. Attention maps and fine-tuning need the PyTorch modules:
refused at submit (orchestrator/jobspec/checks.py) and here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.constants import MODEL_CONFIG_FILE, ONNX_MODEL_FILE
from workers.cores import worker_cores
from workers.errors import ModelLoadError

INPUT_NAME = "pixel_values"
# Embedding -> graph output name. Plain "mean" or "cls" can collide with a value the exporter
# names inside the graph (Dinov2 with registers has a "mean"): ORT then refuses the model.
OUTPUT_NAMES = {"logits": "logits", "cls": "cls_embedding", "pooled": "pooled_embedding", "mean": "mean_embedding",
                "patches": "patch_embeddings"}


def compute_threads() -> int:
    """The compute threads this worker was given: torch's (OMP_NUM_THREADS, which the embedded stack
    sets to cores / workers) within the process's cores. ORT has its own pool and does not read
    OMP_NUM_THREADS: given every core, two workers on two cores would run four threads."""
    return max(1, min(worker_cores(), torch.get_num_threads()))


def providers(device: str) -> list[str]:
    """CUDAExecutionProvider where a GPU is visible and onnxruntime has it (the onnxruntime-gpu wheel)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ModelLoadError("device 'cuda' was asked for an ONNX model, but this worker's onnxruntime has no "
                             f"CUDAExecutionProvider or no GPU is visible (it has {', '.join(available)}): install "
                             "onnxruntime-gpu on GPU workers, or use --device cpu")
    return (["CUDAExecutionProvider"] if cuda and device != "cpu" else []) + ["CPUExecutionProvider"]


def session(path: Path, device: str = "cpu"):
    """An ORT session: every graph optimization, intra-op threads = the worker's compute threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = compute_threads()
    options.inter_op_num_threads = 1  # one graph runs at a time (the model's lock): no parallel branches to fill
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except ModelLoadError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"ONNX model {path} cannot be loaded by ONNX Runtime: {str(e).splitlines()[0]}") from e


@dataclass
class OrtModule:
    """The `module` of an ONNX LoadedModel: runs the graph for the outputs a head asks for."""

    session: Any  # an onnxruntime.InferenceSession (onnxruntime is imported where it is made)
    meta: dict  # the directory's config.json

    def __call__(self, pixels: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        feed = {INPUT_NAME: np.ascontiguousarray(pixels.detach().float().cpu().numpy())}
        graph_names = self.meta.get("outputs") or OUTPUT_NAMES  # what this export's config.json says it has
        arrays = self.session.run([graph_names[name] for name in names], feed)
        return {name: torch.from_numpy(array) for name, array in zip(names, arrays)}

    @property
    def execution_provider(self) -> str:
        return self.session.get_providers()[0]


def check_external_data(path: Path) -> None:
    """Weights stored beside the graph (ONNX external data, used past 2 GB) must be plain files of the
    model's folder: a location like ../../etc/x would have ORT read outside it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and (entry.value != Path(entry.value).name or entry.value in ("", ".", "..")):
                raise ModelLoadError(f"ONNX model {path} keeps weights at {entry.value!r}, outside its folder: refused")


def source_library(config: dict) -> str:
    """Whose preprocessing rules an export made before they were written down keeps: its source's
    (config.json `source.family`: "timm", or one of the HF kinds), as a new export records them."""
    family = str((config.get("source") or {}).get("family", ""))
    return "timm" if family == "timm" else "transformers"


def load_onnx(ref: str, path: Path, device: str = "auto"):
    """A LoadedModel that runs the export in `path` on ONNX Runtime (fp32 inputs on the CPU side)."""
    from workers.decode.preprocess import Preprocess
    from workers.families import Onnx
    from workers.loaded import LoadedModel

    config = json.loads((path / MODEL_CONFIG_FILE).read_text())
    model_path = path / config.get("model_file", ONNX_MODEL_FILE)
    if not model_path.is_file() or model_path.name != config.get("model_file", ONNX_MODEL_FILE):
        raise ModelLoadError(f"ONNX model directory {path} has no {config.get('model_file', ONNX_MODEL_FILE)}")
    check_external_data(model_path)
    try:
        prep = Preprocess.from_json(config["preprocess"], source_library(config))
        id2label = {int(i): str(v) for i, v in config["id2label"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"ONNX model directory {path}: config.json lacks the preprocessing or labels an export "
                             f"writes ({type(e).__name__}: {e}); export the model again") from e
    digest = hashlib.sha256(json.dumps(prep.to_json(), sort_keys=True).encode())
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    module = OrtModule(session(model_path, device), config)
    # Pixels stay on the CPU: ORT copies them to its own device (CUDA EP) itself.
    return LoadedModel(ref, Onnx(module), module, prep, id2label, torch.device("cpu"), torch.float32,
                       "sha256:" + digest.hexdigest())
