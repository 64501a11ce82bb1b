"""Export jobs: a PyTorch model becomes an ONNX model directory, checked against PyTorch first.

The model loads through workers.models.load like every other job's, so what is exported
is exactly what classify and embed would run. One wrapper module returns, from a single
forward pass, the logits and the embeddings as workers/heads.py defines them (`cls` and
`mean` with the same prefix-token and pooling rules, and the patch tokens), so an ONNX
run feeds classify, evaluate and embed unchanged.

A model without a trained classifier (a ViT/DINOv2/MAE backbone, CLIP or SigLIP, whose
vision side is exported, a timm image projection) has no logits output: its graph returns
the embeddings, `pooled` too where the family has one apart from `cls` (CLIP's `cls` is the
projected image embedding, `pooled` the output before the projection), its config.json
says `"classifier": false` (submit refuses classify on it) and its parity check is on `cls`.
A graph that draws random numbers (MAE's masking noise, were it not the identity the
family passes) is refused: its outputs would change from run to run.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), the one
torch maintains (the TorchScript exporter is deprecated). It exported every family the
tests build (HF ViT, DeiT, BEiT, Dinov2 with and without registers; timm ViT with
registers, without a class token, distilled DeiT, non-square) with a dynamic batch axis
and LayerNormalization kept as one op from opset 17.

Parity (workers/onnx/parity.py): the export's outputs are compared with PyTorch fp32 on
the CPU over sample images decoded by the job's own pipeline (`--input`, else synthetic
images), and the job fails with the figures when they differ by more than the spec allows.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orchestrator.constants import EXPORT_REPORT_FILE, MODEL_CONFIG_FILE, ONNX_MODEL_FILE
from orchestrator.jobspec.modelkinds import ModelKind
from orchestrator.jobspec.modelrefs import ONNX_FORMAT
from orchestrator.jobspec.modelspecs import ExportSpec
from orchestrator.lifecycle.commits import Exported, ShardWork
from orchestrator.store.storage import join
from workers.errors import ExportFailed, ModelLoadError
from workers.loaded import LoadedModel
from workers.models import load
from workers.onnx.parity import (
    check_parity,
    graph_outputs,
    ort_outputs,
    parity,
    sample_pixels,
    thresholds,
    torch_outputs,
)
from workers.onnx.runtime import INPUT_NAME, OUTPUT_NAMES, session

_TWO_GB = 2 * 1024 ** 3  # protobuf's limit: larger models keep their weights beside the graph
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                        "Bernoulli"})


class GraphOutputs(torch.nn.Module):
    """`names` (onnxparity.graph_outputs: logits where there is a classifier, cls, pooled where the family
    has it, mean, patches) from one forward pass of the source model, as the heads define them
    (workers/families.py: `logits_and_embed`)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.model, self.module, self.prefix = model, model.module, model.family.prefix_tokens
        self.names = graph_outputs(model.family)

    def forward(self, pixel_values: torch.Tensor):
        logits, embedded = self.model.family.logits_and_embed(pixel_values)
        patches = embedded.tokens[:, self.prefix:]
        every = {"logits": logits, "cls": embedded.image, "pooled": embedded.pooled,
                 "mean": patches.float().mean(dim=1), "patches": patches}
        return tuple(every[name] for name in self.names)

    def close(self) -> None:
        """Nothing is left on the model (kept for callers that close what they open)."""


def export_graph(wrapper: GraphOutputs, path: Path, opset: int) -> None:
    """The wrapper as ONNX at `path`: dynamic batch, fixed input size; ExportFailed with the exporter's reason."""
    height, width = wrapper.model.input_size
    example = torch.randn(2, 3, height, width)
    size = sum(p.numel() * p.element_size() for p in wrapper.module.parameters())
    try:
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAMES[name] for name in wrapper.names],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=opset, dynamo=True, external_data=size >= _TWO_GB, verbose=False,
        )
    except Exception as e:  # the exporter raises many types; none is fixed by retrying
        raise ExportFailed(f"torch.onnx.export (dynamo) failed for {wrapper.model.ref}: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    check_deterministic(path, wrapper.model.ref)


def check_deterministic(path: Path, ref: str) -> None:
    """ExportFailed when the graph draws random numbers: its outputs would change from
    run to run, and no parity check on a few images proves otherwise (MAE's random masking permutes the
    patch tokens without changing its cls)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    ops |= {node.op_type for function in graph.functions for node in function.node}
    drawn = sorted(ops & RANDOM_OPS)
    if drawn:
        raise ExportFailed(f"the ONNX graph of {ref} draws random numbers ({', '.join(drawn)}): its outputs would "
                           "change from run to run (MAE's random masking?); export refused")


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


# -- the job ---------------------------------------------------------------------------------
def versions(model: LoadedModel) -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
           "onnxruntime": onnxruntime.__version__}
    library = "timm" if model.family.model_kind is ModelKind.TIMM else "transformers"
    out[library] = __import__(library).__version__
    return out


def model_config(model: LoadedModel, spec: ExportSpec, grid: tuple[int, int], names: tuple[str, ...]) -> dict:
    """config.json of the exported directory: what load_onnx and the control plane read (no torch needed).
    A headless export says `"classifier": false` (orchestrator/jobspec/modelkinds.py reads it; a classifier's
    config is what it always was, with no such key) and has no labels."""
    source = model.module.pretrained_cfg if model.family.model_kind is ModelKind.TIMM else model.module.config.to_dict()
    headless = {} if model.family.has_classifier else {"classifier": False}
    return {
        "format": ONNX_FORMAT, "model_file": ONNX_MODEL_FILE, "quantize": spec.quantize, "opset": spec.opset,
        "source": {"ref": model.ref, "family": model.family.name, "fingerprint": model.fingerprint,
                   "architecture": source.get("model_type") or source.get("architecture")},
        "id2label": {str(i): name for i, name in model.id2label.items()} if model.family.has_classifier else {},
        "preprocess": model.prep.to_json(), "cls_source": model.family.cls_source, "prefix_tokens": model.family.prefix_tokens,
        "class_token": model.family.class_token, "grid": list(grid),
        "inputs": {INPUT_NAME: ["batch", 3, *model.input_size]},
        "outputs": {name: OUTPUT_NAMES[name] for name in names}, **headless,
    }


def output_shapes(reference: dict[str, np.ndarray]) -> list[dict]:
    meaning = {"logits": "class scores before softmax", "cls": "the `cls` embedding (see cls_source)",
               "pooled": "the pooled output before any image projection (SigLIP's: its cls)",
               "mean": "mean of the patch tokens of the final hidden state", "patches": "every patch token"}
    return [{"name": OUTPUT_NAMES[name], "shape": ["batch", *reference[name].shape[1:]], "dtype": "float32",
             "meaning": meaning[name]} for name in reference]


def export(spec: ExportSpec, job_id: str, ctx, report: Callable[[dict], None] | None = None) -> ShardWork:
    """Export, check parity, write model.onnx + config.json + export_report.json into spec.output (the job's folder)."""
    t0 = time.perf_counter()
    model = load(spec.model, "cpu", "fp32", settings=ctx.settings, store=ctx.store)  # a private copy: hooks go on it
    pixels, sample = sample_pixels(spec, model, ctx)
    wrapper = GraphOutputs(model).eval()
    stats: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vitbatch-export-") as tmp:
            fp32_path, final = Path(tmp) / ONNX_MODEL_FILE, Path(tmp) / ONNX_MODEL_FILE
            export_graph(wrapper, fp32_path, spec.opset)
            stats["export_s"] = round(time.perf_counter() - t0, 3)
            reference = torch_outputs(wrapper, pixels, wrapper.names)
            fp32_session = session(fp32_path, spec.device)
            figures = {"fp32": parity(reference, ort_outputs(fp32_session, pixels, wrapper.names))}
            provider = fp32_session.get_providers()[0]
            if spec.quantize == "int8":
                final = Path(tmp) / "model.int8.onnx"
                quantize_int8(fp32_path, final)
                figures["int8"] = parity(reference, ort_outputs(session(final, spec.device), pixels, wrapper.names))
            stats["total_s"] = round(time.perf_counter() - t0, 3)
            if report:
                rows = len(pixels) + len(sample["errors"])  # what submit counted: decoded or not
                report({"done": rows, "total": rows})
            grid = _grid(model, reference["patches"].shape[1])
            failure = check_parity(spec, figures)
            record = {
                "exporter": "torch.onnx.export(dynamo=True)", "opset": spec.opset, "quantize": spec.quantize,
                "versions": versions(model), "execution_provider": provider,
                "source": {"ref": model.ref, "family": model.family.name, "fingerprint": model.fingerprint},
                "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, *model.input_size], "dtype": "float32"}],
                "outputs": output_shapes(reference), "sample": sample, "parity": figures,
                "thresholds": thresholds(spec, headless="logits" not in reference),
                "passed": failure is None, "failure": failure, "seconds": stats,
            }
            ctx.store.write(join(spec.output, EXPORT_REPORT_FILE), json.dumps(record, indent=2).encode())
            if failure is not None:
                raise ExportFailed(f"parity check failed: {failure} (report: {join(spec.output, EXPORT_REPORT_FILE)})")
            data = final.read_bytes()
            ctx.store.write(join(spec.output, ONNX_MODEL_FILE), data)
            config = model_config(model, spec, grid, wrapper.names)
            ctx.store.write(join(spec.output, MODEL_CONFIG_FILE), json.dumps(config, indent=2).encode())
    finally:
        wrapper.close()
    fingerprint = "sha256:" + hashlib.sha256(json.dumps(model.prep.to_json(), sort_keys=True).encode() + data).hexdigest()
    return ShardWork(rows=len(pixels) + len(sample["errors"]), errors=len(sample["errors"]), stats=stats,
                     model_fingerprint=fingerprint, outcome=Exported(figures))


def _grid(model: LoadedModel, n_patches: int) -> tuple[int, int]:
    from workers.attention import grid_shape

    try:
        return grid_shape(model, n_patches)
    except (ValueError, ModelLoadError) as e:
        raise ExportFailed(f"the export's patch tokens do not fill the model's patch grid: {e}") from e
