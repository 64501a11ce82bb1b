"""Attention maps: CLS-to-patch attention per layer, attention rollout, PNG overlays.

What a stored map is (also in the README):
- layer maps: row 0 (the CLS query) of the post-softmax attention matrix of the chosen
  layer, columns of the patch tokens only (CLS-to-CLS and any other prefix tokens are
  dropped), renormalized to sum to 1, reshaped to the patch grid; averaged over heads
  (`heads=mean`) or kept per head (`heads=all`, shape [heads, gh, gw]).
- rollout (Abnar & Zuidema 2020): per layer the head-mean attention A, plus the identity
  for the residual path, rows renormalized: (A + I) / 2; multiplied from the first layer
  to the last; then the CLS row, patch columns, renormalized to sum to 1.
- models without a class token (timm class_token=False): no CLS query exists, so the map
  is the mean over the patch queries' rows (how much attention each patch receives),
  then the same patch columns and renormalization.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from orchestrator.constants import OVERLAYS_DIR
from orchestrator.inputs.manifest import Item
from orchestrator.jobspec.modelkinds import ModelKind
from workers.decode.preprocess import seen_box
from workers.errors import ModelLoadError
from workers.heads import INDEX_SCHEMA, ArrayHead
from workers.loaded import LoadedModel

OVERLAY_MAX_SIDE = 512


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """[B, heads, T, T] per layer -> [B, T, T] rollout through every layer."""
    result = None
    for attn in attentions:
        a = attn.float().mean(dim=1)
        eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None  # a model has one layer at least
    return result


def query_rows(attention: torch.Tensor, prefix: int, class_token: bool) -> torch.Tensor:
    """[..., T, T] -> [..., T]: the CLS query's row, or the mean over patch queries without a CLS token."""
    if class_token:
        return attention[..., 0, :]
    return attention[..., prefix:, :].float().mean(dim=-2)


def cls_to_patches(rows: torch.Tensor, prefix: int) -> torch.Tensor:
    """CLS query row(s) [..., T] -> patch columns only, renormalized to sum to 1."""
    patches = rows[..., prefix:].float()
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def grid_shape(model: LoadedModel, n_patches: int) -> tuple[int, int]:
    gh, gw = model.family.grid(model.input_size)
    if gh * gw != n_patches:
        raise ModelLoadError(f"model {model.ref}: {n_patches} patch tokens do not fill its {gh}x{gw} patch grid")
    return gh, gw


class AttentionHead(ArrayHead):
    def __init__(self, model: LoadedModel, shard: int, *, layers: list[int], heads: str, with_rollout: bool,
                 overlay_indices: set[int], overlay_prefix: str = "") -> None:
        super().__init__(model, shard)
        if model.family.model_kind is ModelKind.ONNX:  # submit refuses it; a spec run in-process gets the same reason
            raise ModelLoadError(f"model {model.ref} is an ONNX export: attention maps need the PyTorch model")
        self.class_token = model.family.class_token
        self.overlay_prefix = overlay_prefix  # the job's folder under the output: the column reads from the prefix
        self.layers, self.heads, self.with_rollout = layers, heads, with_rollout
        self.overlay_indices = overlay_indices
        self.prefix = model.family.prefix_tokens
        self.overlays: dict[int, bytes] = {}
        n_layers = model.family.depth
        missing = [layer for layer in layers if not -n_layers <= layer < n_layers]
        if missing:  # layer % n_layers would silently store another layer's map
            raise ModelLoadError(f"layers {missing} do not exist: the model has {n_layers} layers "
                                 f"(0 to {n_layers - 1}, or -1 to -{n_layers} from the last)")

    def wants_image(self, index: int) -> bool:
        return index in self.overlay_indices

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        attentions = self.model.family.attentions(pixels)
        n_layers = len(attentions)
        gh, gw = grid_shape(self.model, attentions[0].shape[-1] - self.prefix)
        out = {}
        for layer in self.layers:
            cls_rows = query_rows(attentions[layer % n_layers], self.prefix, self.class_token)  # [B, heads, T]
            maps = cls_to_patches(cls_rows, self.prefix)
            maps = maps.mean(dim=1) if self.heads == "mean" else maps
            out[f"layer{layer % n_layers}"] = maps.reshape(*maps.shape[:-1], gh, gw)
        if self.with_rollout:
            rows = query_rows(rollout(attentions), self.prefix, self.class_token)
            out["rollout"] = cls_to_patches(rows, self.prefix).reshape(-1, gh, gw)
        return out

    def collect(self, indices: list[int], items: list[Item], output: dict[str, torch.Tensor], images=None) -> None:
        self.add_ok(indices, items)
        for name, values in output.items():
            self.keep(name, indices, values)
        heat = output.get("rollout", next(iter(output.values())))
        for position, index in enumerate(indices):
            if images and images[position] is not None:
                grid = heat[position].float()
                grid = grid.mean(dim=0) if grid.ndim == 3 else grid
                self.overlays[index] = overlay_png(images[position], grid.cpu().numpy(), self.model)

    index_schema = INDEX_SCHEMA.append(pa.field("overlay", pa.string()))

    def extra_parts(self) -> dict[str, bytes]:
        out = {}
        for index, png in self.overlays.items():
            name = f"{OVERLAYS_DIR}/part-{self.shard:05d}-{self.rows[index]['row']:06d}.png"
            self.rows[index]["overlay"] = self.overlay_prefix + name
            out[name] = png
        return out


def overlay_png(image: Image.Image, grid: np.ndarray, model: LoadedModel) -> bytes:
    """The heatmap upsampled over the image the model saw, at the input's aspect ratio."""
    image = image.copy()
    image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    heat = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
    box = seen_box(*image.size, model.prep)
    width, height = box[2] - box[0], box[3] - box[1]
    heat_img = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize((width, height), Image.Resampling.BILINEAR)
    red = Image.new("RGB", (width, height), (255, 0, 0))
    region = image.crop(box)
    blended = Image.composite(red, region, heat_img.point(lambda v: int(v * 0.6)))
    image.paste(blended, box[:2])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
