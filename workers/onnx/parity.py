"""The export's parity check: sample images through the job's own decode and resize, the
PyTorch and ONNX Runtime outputs on them, the figures that compare the two, and the verdict.

A model with a trained classifier is judged on its logits (max difference relative to the
largest |logit|, top-1 agreement on decisive images). A headless one (a backbone, CLIP,
SigLIP, a timm image projection) is judged on its `cls` embedding: the fp32 export by the
max |difference| relative to the sample's largest |cls| value (the same --fp32-tolerance),
the int8 one by agreement: the share of sample images whose int8 `cls` has a cosine
similarity of at least AGREE_COSINE with PyTorch fp32's (the same --int8-min-agreement).
Cosine is what embeddings are compared by downstream (retrieval, zero-shot, clustering),
and it ignores the uniform scale error int8 weights bring.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from orchestrator.inputs.manifest import Item
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.modelspecs import ExportSpec
from workers.compute import DeviceStage
from workers.decode.preprocess import Decoder
from workers.errors import ExportFailed
from workers.loaded import LoadedModel
from workers.onnx.runtime import INPUT_NAME, OUTPUT_NAMES
from workers.pipeline import DecodePath, Failed, ShardPipeline
from workers.stagetimes import StageTimes

DECISIVE_MARGIN = 0.05  # top-1 minus top-2 probability: below it, argmax is decided by rounding
PARITY_BATCH = 16
SYNTHETIC_SIZE = (500, 375)
AGREE_COSINE = 0.99  # an int8 `cls` this close to PyTorch fp32's (cosine) agrees with it
EMBEDDINGS = ("cls", "pooled", "mean", "patches")


def graph_outputs(family) -> tuple[str, ...]:
    """What GraphOutputs returns for a family, in order: logits only with a trained classifier,
    `pooled` only where it differs from `cls` (a classifier's are logits, cls, mean, patches)."""
    return ((("logits",) if family.has_classifier else ()) + ("cls",)
            + (("pooled",) if family.has_pooled else ()) + ("mean", "patches"))


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
        img = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
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
    path = DecodePath(Decoder(model.prep, ctx.settings.max_pixels))  # threads: every pixel on the host
    times = StageTimes()  # not reported: the parity check has no stage stats
    pipeline = ShardPipeline(ctx.store, path, times, batch_size=PARITY_BATCH, read_concurrency=8,
                             max_bytes=ctx.settings.max_object_bytes, blobs=blobs)
    device = DeviceStage(model, path.decoder, PARITY_BATCH, times)
    batches, errors = [], {}
    for event in pipeline.batches(items):  # in manifest order; failed items are left out
        if isinstance(event, Failed):
            errors[event.item.key] = event.reason
        else:
            batches.append(device.to_device(event.decoded))
    if not batches:
        raise ExportFailed(f"no sample image could be decoded for the parity check: {dict(list(errors.items())[:3])}")
    pixels = torch.cat(batches)
    about = {"kind": "input" if spec.input else "synthetic", "images": len(pixels), "errors": errors,
             "source": spec.input or f"{spec.samples} synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEGs"}
    return pixels, about


# -- parity ----------------------------------------------------------------------------------
def torch_outputs(wrapper: torch.nn.Module, pixels: torch.Tensor, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The wrapper's outputs (`names`, in its order) on the pixels, batch by batch."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.inference_mode():
        for start in range(0, len(pixels), PARITY_BATCH):
            for name, value in zip(names, wrapper(pixels[start:start + PARITY_BATCH])):
                parts[name].append(value.float().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def ort_outputs(ort_session, pixels: torch.Tensor, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The graph's outputs `names` on the pixels, batch by batch."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(pixels), PARITY_BATCH):
        batch = np.ascontiguousarray(pixels[start:start + PARITY_BATCH].numpy())
        for name, value in zip(names, ort_session.run([OUTPUT_NAMES[n] for n in names], {INPUT_NAME: batch})):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """The figures of a classifier's export (logits_parity) or a headless one's (embedding_parity)."""
    return (logits_parity if "logits" in reference else embedding_parity)(reference, got)


def logits_parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
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
        "max_abs_embedding_diff": embedding_diffs(reference, got),
    }


def embedding_parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Max |cls| difference (absolute and relative to the sample's largest |cls| value), the cosine
    similarity of each image's cls (least, mean, and the share at or above AGREE_COSINE), and every
    embedding's max difference."""
    ref, out = reference["cls"].astype(np.float64), got["cls"].astype(np.float64)
    diff = float(np.abs(ref - out).max())
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = (ref * out).sum(axis=1) / np.maximum(norms, 1e-12)
    return {
        "max_abs_cls_diff": diff, "max_abs_cls_diff_relative": diff / max(float(np.abs(ref).max()), 1e-12),
        "cls_cosine_min": float(cosine.min()), "cls_cosine_mean": float(cosine.mean()),
        "cls_agreement": float((cosine >= AGREE_COSINE).mean()), "images": len(ref),
        "max_abs_embedding_diff": embedding_diffs(reference, got),
    }


def embedding_diffs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.abs(reference[name] - got[name]).max()) for name in EMBEDDINGS if name in reference}


def thresholds(spec: ExportSpec, headless: bool) -> dict[str, float]:
    """The limits the verdict applies, for the report: a headless export is judged by cosine, not by a margin."""
    limits = {"fp32_tolerance": spec.fp32_tolerance, "int8_min_agreement": spec.int8_min_agreement}
    return {**limits, "agree_cosine": AGREE_COSINE} if headless else {**limits, "decisive_margin": DECISIVE_MARGIN}


def check_parity(spec: ExportSpec, figures: dict) -> str | None:
    """Why the export fails its parity check, or None."""
    fp32, int8 = figures["fp32"], figures.get("int8")
    if "max_abs_logit_diff" not in fp32:
        return check_embedding_parity(spec, fp32, int8)
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


def check_embedding_parity(spec: ExportSpec, fp32: dict, int8: dict | None) -> str | None:
    """Why a headless export fails its parity check (on its `cls` embedding), or None."""
    if fp32["max_abs_cls_diff_relative"] > spec.fp32_tolerance:
        return (f"fp32 ONNX cls embeddings differ from PyTorch by {fp32['max_abs_cls_diff']:.3g} "
                f"({fp32['max_abs_cls_diff_relative']:.3g} of the largest |cls| value; allowed {spec.fp32_tolerance})")
    if int8 is not None and int8["cls_agreement"] < spec.int8_min_agreement:
        return (f"int8 cls embeddings agree with PyTorch fp32 (cosine >= {AGREE_COSINE}) on {int8['cls_agreement']:.1%} "
                f"of {int8['images']} sample images (least cosine {int8['cls_cosine_min']:.4f}); "
                f"--int8-min-agreement is {spec.int8_min_agreement:.1%}")
    return None
