"""Export jobs: a PyTorch model becomes an ONNX model directory, checked against PyTorch first.

The model loads through workers.models.load like every other job's, so what is exported
is exactly what classify and embed would run. One wrapper module returns, from a single
forward pass, the logits and the embeddings as workers/heads.py defines them (`cls` and
`mean` with the same prefix-token and pooling rules, and the patch tokens), so an ONNX
run feeds classify, evaluate and embed unchanged.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), the one
torch maintains (the TorchScript exporter is deprecated). It exported every family the
tests build (HF ViT, DeiT, BEiT, Dinov2 with and without registers; timm ViT with
registers, without a class token, distilled DeiT, non-square) with a dynamic batch axis
and LayerNormalization kept as one op from opset 17.

Parity: the export's outputs are compared with PyTorch fp32 on the CPU over sample
images decoded by the job's own pipeline (`--input`, else synthetic images), and the job
fails with the figures when they differ by more than the spec allows.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from orchestrator.jobs import ExportSpec
from orchestrator.modelinfo import ONNX_FORMAT
from orchestrator.manifest import Item
from orchestrator.planner import plan
from orchestrator.storage import join
from workers.errors import ExportFailed
from workers.heads import cls_source, has_class_token, hf_cls, prefix_tokens
from workers.models import LoadedModel, load
from workers.onnxmodel import INPUT_NAME, MODEL_FILE, OUTPUT_NAMES, session
from workers.pipeline import ShardPipeline

REPORT_FILE = "export_report.json"
DECISIVE_MARGIN = 0.05  # top-1 minus top-2 probability: below it, argmax is decided by rounding
PARITY_BATCH = 16
SYNTHETIC_SIZE = (500, 375)
EMBEDDINGS = ("cls", "mean", "patches")
_GRAPH_OUTPUTS = ("logits", *EMBEDDINGS)
_TWO_GB = 2 * 1024 ** 3  # protobuf's limit: larger models keep their weights beside the graph


class GraphOutputs(torch.nn.Module):
    """logits, cls, mean, patches from one forward pass of the source model, as the heads define them.

    HF: the classifier's forward runs once and a hook on its base model keeps the hidden
    state it saw (removed by `close`); timm: forward_features, then the head twice (cheap).
    """

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.model, self.module, self.prefix = model, model.module, prefix_tokens(model)
        self._outputs = None
        self._hook = (model.module.base_model.register_forward_hook(self._keep) if model.family == "hf" else None)

    def _keep(self, _module, _inputs, outputs) -> None:
        self._outputs = outputs

    def forward(self, pixel_values: torch.Tensor):
        if self.model.family == "hf":
            logits = self.module(pixel_values=pixel_values).logits
            outputs, self._outputs = self._outputs, None
            tokens, cls = outputs.last_hidden_state, hf_cls(self.model, outputs)
        else:
            tokens = self.module.forward_features(pixel_values)
            cls = self.module.forward_head(tokens, pre_logits=True)
            logits = self.module.forward_head(tokens)
        patches = tokens[:, self.prefix:]
        return logits, cls, patches.float().mean(dim=1), patches

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()


def export_graph(wrapper: GraphOutputs, path: Path, opset: int) -> None:
    """The wrapper as ONNX at `path`: dynamic batch, fixed input size; ExportFailed with the exporter's reason."""
    height, width = wrapper.model.input_size
    example = torch.randn(2, 3, height, width)
    size = sum(p.numel() * p.element_size() for p in wrapper.module.parameters())
    try:
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAMES[name] for name in _GRAPH_OUTPUTS],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=opset, dynamo=True, external_data=size >= _TWO_GB, verbose=False,
        )
    except Exception as e:  # the exporter raises many types; none is fixed by retrying
        raise ExportFailed(f"torch.onnx.export (dynamo) failed for {wrapper.model.ref}: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def quantize_int8(source: Path, dest: Path) -> None:
    """ONNX Runtime dynamic quantization: MatMul weights to int8, activations quantized per batch at run time.

    Only MatMuls with a constant weight: attention's activation x activation products stay
    fp32 (quantizing both sides costs accuracy and gains little); Conv (the patch embedding,
    one layer) stays fp32 too, as ConvInteger is slower than fp32 Conv on ORT's CPU kernels.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        # The dynamo exporter's value_info can disagree with ONNX shape inference (a Gemm's transposed
        # weight), which the quantizer runs: drop it, the quantizer infers the shapes again.
        graph = onnx.load(str(source))
        del graph.graph.value_info[:]
        plain = dest.with_suffix(".plain.onnx")
        onnx.save(graph, str(plain))
        quantize_dynamic(str(plain), str(dest), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=False, extra_options={"MatMulConstBOnly": True})
    except Exception as e:
        raise ExportFailed(f"int8 dynamic quantization failed: {type(e).__name__}: {e}") from e


# -- sample images --------------------------------------------------------------------------
def synthetic_jpegs(n: int, size: tuple[int, int] = SYNTHETIC_SIZE, seed: int = 0) -> dict[str, bytes]:
    """n deterministic photo-like JPEGs: smooth colour fields, edges, shapes and sensor-like noise.

    Used when the job names no --input: they cover the whole pixel range and the decode path
    real photos take (JPEG, resize, crop), so they check the graph; they are not your data.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        coarse = rng.integers(0, 256, (rng.integers(2, 7), rng.integers(2, 7), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 8)):
            x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2))))
        noisy = np.asarray(img, np.int16) + rng.normal(0, 6, (size[1], size[0], 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out[f"synthetic-{i:04d}.jpg"] = buffer.getvalue()
    return out


class _KeepPixels:
    """A pipeline head that keeps the normalized batches (what the model would see) in manifest order."""

    def __init__(self) -> None:
        self.pixels: dict[int, torch.Tensor] = {}
        self.errors: dict[str, str] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.clone()

    def add(self, indices: list[int], items: list[Item], output: torch.Tensor) -> None:
        for index, row in zip(indices, output):
            self.pixels[index] = row

    def add_error(self, index: int, item: Item, reason: str) -> None:
        self.errors[item.key] = reason


def sample_pixels(spec: ExportSpec, model: LoadedModel, ctx) -> tuple[torch.Tensor, dict]:
    """The sample images through the job pipeline's decode and resize; returns [N, 3, H, W] and what they were."""
    blobs: dict[str, bytes | str] = {}
    if spec.input is not None:
        images = [item for item in plan(spec.input, 1_000_000, ctx.store).items if not item.tar]
        step = max(len(images) / spec.samples, 1.0)
        items = [images[int(k * step)] for k in range(min(spec.samples, len(images)))]  # spread over the input
    else:
        blobs = {f"synthetic:{key}": data for key, data in synthetic_jpegs(spec.samples).items()}
        items = [Item(key=uri.split(":", 1)[1], uri=uri) for uri in blobs]
    head = _KeepPixels()
    ShardPipeline(model, ctx.store, batch_size=PARITY_BATCH, read_concurrency=8,
                  max_bytes=ctx.settings.max_object_bytes, max_pixels=ctx.settings.max_pixels,
                  blobs=blobs).run(items, head)
    if not head.pixels:
        raise ExportFailed(f"no sample image could be decoded for the parity check: {dict(list(head.errors.items())[:3])}")
    pixels = torch.stack([head.pixels[i] for i in sorted(head.pixels)])
    about = {"kind": "input" if spec.input else "synthetic", "images": len(pixels), "errors": head.errors,
             "source": spec.input or f"{spec.samples} synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEGs"}
    return pixels, about


# -- parity ----------------------------------------------------------------------------------
def torch_outputs(wrapper: GraphOutputs, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _GRAPH_OUTPUTS}
    with torch.inference_mode():
        for start in range(0, len(pixels), PARITY_BATCH):
            for name, value in zip(_GRAPH_OUTPUTS, wrapper(pixels[start:start + PARITY_BATCH])):
                parts[name].append(value.float().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def ort_outputs(ort_session, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _GRAPH_OUTPUTS}
    for start in range(0, len(pixels), PARITY_BATCH):
        batch = np.ascontiguousarray(pixels[start:start + PARITY_BATCH].numpy())
        for name, value in zip(_GRAPH_OUTPUTS, ort_session.run([OUTPUT_NAMES[n] for n in _GRAPH_OUTPUTS],
                                                               {INPUT_NAME: batch})):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Max |logit| difference (absolute and relative to the sample's largest |logit|), top-1 agreement
    (all images, and decisive ones: PyTorch's top-2 probability margin > DECISIVE_MARGIN), embeddings' max difference."""
    ref, out = reference["logits"].astype(np.float64), got["logits"].astype(np.float64)
    diff = float(np.abs(ref - out).max())
    probs = np.exp(ref - ref.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.concatenate([np.zeros_like(probs), probs], 1)
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN
    agree = ref.argmax(axis=1) == out.argmax(axis=1)
    return {
        "max_abs_logit_diff": diff, "max_abs_logit_diff_relative": diff / max(float(np.abs(ref).max()), 1e-12),
        "top1_agreement": float(agree.mean()), "decisive_images": int(decisive.sum()),
        "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
        "max_abs_embedding_diff": {name: float(np.abs(reference[name] - got[name]).max()) for name in EMBEDDINGS},
    }


def check_parity(spec: ExportSpec, figures: dict) -> str | None:
    """Why the export fails its parity check, or None."""
    fp32, int8 = figures["fp32"], figures.get("int8")
    if fp32["max_abs_logit_diff_relative"] > spec.fp32_tolerance:
        return (f"fp32 ONNX logits differ from PyTorch by {fp32['max_abs_logit_diff']:.3g} "
                f"({fp32['max_abs_logit_diff_relative']:.3g} of the largest logit; allowed {spec.fp32_tolerance})")
    if fp32["top1_agreement_decisive"] not in (None, 1.0):
        return f"fp32 ONNX top-1 agrees with PyTorch on only {fp32['top1_agreement_decisive']:.1%} of decisive images"
    if int8 is not None and int8["top1_agreement_decisive"] is not None \
            and int8["top1_agreement_decisive"] < spec.int8_min_agreement:
        return (f"int8 top-1 agrees with PyTorch fp32 on {int8['top1_agreement_decisive']:.1%} of "
                f"{int8['decisive_images']} decisive images; --int8-min-agreement is {spec.int8_min_agreement:.1%}")
    return None


# -- the job ---------------------------------------------------------------------------------
def versions(family: str) -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
           "onnxruntime": onnxruntime.__version__}
    library = "transformers" if family == "hf" else "timm"
    out[library] = __import__(library).__version__
    return out


def model_config(model: LoadedModel, spec: ExportSpec, grid: tuple[int, int]) -> dict:
    """config.json of the exported directory: what load_onnx and the control plane read (no torch needed)."""
    source = model.module.config.to_dict() if model.family == "hf" else model.module.pretrained_cfg
    return {
        "format": ONNX_FORMAT, "model_file": MODEL_FILE, "quantize": spec.quantize, "opset": spec.opset,
        "source": {"ref": model.ref, "family": model.family, "fingerprint": model.fingerprint,
                   "architecture": source.get("model_type") or source.get("architecture")},
        "id2label": {str(i): name for i, name in model.id2label.items()},
        "preprocess": model.prep.to_json(), "cls_source": cls_source(model), "prefix_tokens": prefix_tokens(model),
        "class_token": has_class_token(model), "grid": list(grid),
        "inputs": {INPUT_NAME: ["batch", 3, *model.input_size]},
        "outputs": {name: OUTPUT_NAMES[name] for name in _GRAPH_OUTPUTS},
    }


def output_shapes(reference: dict[str, np.ndarray]) -> list[dict]:
    meaning = {"logits": "class scores before softmax", "cls": "the `cls` embedding (see cls_source)",
               "mean": "mean of the patch tokens of the final hidden state", "patches": "every patch token"}
    return [{"name": OUTPUT_NAMES[name], "shape": ["batch", *reference[name].shape[1:]], "dtype": "float32",
             "meaning": meaning[name]} for name in _GRAPH_OUTPUTS]


def export(spec: ExportSpec, job_id: str, ctx, report: Callable[[dict], None] | None = None) -> dict:
    """Export, check parity, write model.onnx + config.json + export_report.json into spec.output (the job's folder)."""
    t0 = time.perf_counter()
    model = load(spec.model, "cpu", "fp32", settings=ctx.settings, store=ctx.store)  # a private copy: hooks go on it
    pixels, sample = sample_pixels(spec, model, ctx)
    wrapper = GraphOutputs(model).eval()
    stats: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vitbatch-export-") as tmp:
            fp32_path, final = Path(tmp) / MODEL_FILE, Path(tmp) / MODEL_FILE
            export_graph(wrapper, fp32_path, spec.opset)
            stats["export_s"] = round(time.perf_counter() - t0, 3)
            reference = torch_outputs(wrapper, pixels)
            fp32_session = session(fp32_path, spec.device)
            figures = {"fp32": parity(reference, ort_outputs(fp32_session, pixels))}
            provider = fp32_session.get_providers()[0]
            if spec.quantize == "int8":
                final = Path(tmp) / "model.int8.onnx"
                quantize_int8(fp32_path, final)
                figures["int8"] = parity(reference, ort_outputs(session(final, spec.device), pixels))
            stats["total_s"] = round(time.perf_counter() - t0, 3)
            if report:
                rows = len(pixels) + len(sample["errors"])  # what submit counted: decoded or not
                report({"done": rows, "total": rows})
            grid = _grid(model, reference["patches"].shape[1])
            failure = check_parity(spec, figures)
            record = {
                "exporter": "torch.onnx.export(dynamo=True)", "opset": spec.opset, "quantize": spec.quantize,
                "versions": versions(model.family), "execution_provider": provider,
                "source": {"ref": model.ref, "family": model.family, "fingerprint": model.fingerprint},
                "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, *model.input_size], "dtype": "float32"}],
                "outputs": output_shapes(reference), "sample": sample, "parity": figures,
                "thresholds": {"fp32_tolerance": spec.fp32_tolerance, "int8_min_agreement": spec.int8_min_agreement,
                               "decisive_margin": DECISIVE_MARGIN},
                "passed": failure is None, "failure": failure, "seconds": stats,
            }
            ctx.store.write(join(spec.output, REPORT_FILE), json.dumps(record, indent=2).encode())
            if failure is not None:
                raise ExportFailed(f"parity check failed: {failure} (report: {join(spec.output, REPORT_FILE)})")
            data = final.read_bytes()
            ctx.store.write(join(spec.output, MODEL_FILE), data)
            config = model_config(model, spec, grid)
            ctx.store.write(join(spec.output, "config.json"), json.dumps(config, indent=2).encode())
    finally:
        wrapper.close()
    fingerprint = "sha256:" + hashlib.sha256(json.dumps(model.prep.to_json(), sort_keys=True).encode() + data).hexdigest()
    return {"rows": len(pixels) + len(sample["errors"]), "errors": len(sample["errors"]), "stats": stats,
            "model_fingerprint": fingerprint, "parity": figures}


def _grid(model: LoadedModel, n_patches: int) -> tuple[int, int]:
    from workers.attention import grid_shape

    try:
        return grid_shape(model, n_patches)
    except ValueError as e:
        raise ExportFailed(f"the export's patch tokens do not fill the model's patch grid: {e}") from e
