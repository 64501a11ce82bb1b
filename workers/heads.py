"""Per-kind compute: what a batch of normalized pixels becomes, and the files a shard writes.

A head is a pure `forward(pixels)` plus a collector: `collect` turns a batch's output into
rows (and arrays), `error` records an item that never reached the model, and `parts()`
serialises the shard. Errors arrive before their neighbours' batches, so a head keys
everything by the item's index in the shard and sorts when the shard ends.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch

from orchestrator.constants import part_name
from orchestrator.manifest import Item
from workers.errors import ModelLoadError
from workers.models import LoadedModel
from workers.writers import parquet_bytes

CLASSIFY_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("label", pa.string()), ("label_id", pa.int32()),
    ("score", pa.float32()), ("topk_labels", pa.list_(pa.string())), ("topk_ids", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())), ("error", pa.string()),
])
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("shard", pa.int32()), ("row", pa.int32()), ("error", pa.string()),
])


def top_k(model: LoadedModel, pixels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores and class ids of the k best classes, on the CPU ([B, k] each)."""
    scores, ids = logits(model, pixels).float().softmax(dim=-1).topk(k, dim=-1)
    return scores.cpu(), ids.cpu()  # .cpu() waits for the device


def logits(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    if model.family == "onnx":
        return model.module(pixels, ["logits"])["logits"]
    if model.family == "hf":
        return model.module(pixel_values=pixels).logits
    return model.module(pixels)


def prefix_tokens(model: LoadedModel) -> int:
    """Tokens before the patches: CLS (+ distillation or register tokens); 0 for timm models without a class token.

    Dinov2 with registers keeps its register tokens right after CLS (config.num_register_tokens).
    """
    if model.family == "onnx":
        return int(model.module.meta["prefix_tokens"])
    if model.family == "timm":
        return int(getattr(model.module, "num_prefix_tokens", 1))
    config = model.module.config
    return 1 + (config.model_type == "deit") + int(getattr(config, "num_register_tokens", 0) or 0)


def has_class_token(model: LoadedModel) -> bool:
    """Whether token 0 is a CLS token (timm's class_token=False models start with the patches or registers)."""
    if model.family == "onnx":
        return bool(model.module.meta.get("class_token", True))
    if model.family == "timm":
        return getattr(model.module, "cls_token", None) is not None
    return True


def cls_source(model: LoadedModel) -> str:
    """What the `cls` embedding is: "cls_token" (token 0 of the final normalized state) or "pooled"
    (the features the classifier reads, where that is not the CLS token: timm avg/map pooling and
    models without a class token, timm's distilled DeiT (mean of CLS and distillation tokens), BEiT
    with mean pooling (its final state is not normalized and its CLS token is not what it classifies)."""
    if model.family == "onnx":
        return str(model.module.meta["cls_source"])
    if model.family == "timm":
        module = model.module
        token = (getattr(module, "global_pool", "token") == "token" and has_class_token(model)
                 and getattr(module, "dist_token", None) is None)
        return "cls_token" if token else "pooled"
    return "pooled" if getattr(model.module.config, "use_mean_pooling", False) else "cls_token"


def hf_cls(model: LoadedModel, outputs) -> torch.Tensor:
    """The `cls` embedding from an HF base model's outputs (see cls_source)."""
    if cls_source(model) == "pooled":
        return outputs.pooler_output
    return outputs.last_hidden_state[:, 0]


def final_tokens(model: LoadedModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of the final hidden state [B, T, hidden] and the `cls` embedding [B, hidden] (PyTorch)."""
    if model.family == "hf":
        outputs = model.module.base_model(pixel_values=pixels)
        return outputs.last_hidden_state, hf_cls(model, outputs)
    tokens = model.module.forward_features(pixels)
    return tokens, model.module.forward_head(tokens, pre_logits=True)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class Head:
    """forward (pure) + collect/error (rows by manifest index); `parts()`: file name -> bytes."""

    def __init__(self, model: LoadedModel, shard: int) -> None:
        self.model, self.shard = model, shard
        self.rows: dict[int, dict] = {}

    def forward(self, pixels: torch.Tensor):
        raise NotImplementedError

    def collect(self, indices: list[int], items: list[Item], output, images=None) -> None:
        raise NotImplementedError

    def wants_image(self, index: int) -> bool:
        """Whether item `index`'s decoded image should reach `collect` (attention overlays)."""
        return False

    def error(self, index: int, item: Item, reason: str) -> None:
        self.rows[index] = self.error_row(item, reason)

    def error_row(self, item: Item, reason: str) -> dict:
        raise NotImplementedError

    def ordered_rows(self) -> list[dict]:
        return [self.rows[i] for i in sorted(self.rows)]

    @property
    def errors(self) -> int:
        return sum(1 for row in self.rows.values() if row["error"] is not None)


class ClassifyHead(Head):
    """Softmax top-k over the model's labels."""

    def __init__(self, model: LoadedModel, shard: int, top_k: int) -> None:
        super().__init__(model, shard)
        if top_k > len(model.id2label):
            raise ModelLoadError(f"top_k={top_k} is larger than the model's {len(model.id2label)} labels")
        self.top_k = top_k

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k(self.model, pixels, self.top_k)

    def collect(self, indices: list[int], items: list[Item], output, images=None) -> None:
        scores, ids = output
        labels = self.model.id2label
        for index, item, row_scores, row_ids in zip(indices, items, scores.tolist(), ids.tolist()):
            self.rows[index] = {
                "key": item.key, "etag": item.etag, "label": labels[row_ids[0]], "label_id": row_ids[0],
                "score": row_scores[0], "topk_labels": [labels[i] for i in row_ids], "topk_ids": row_ids,
                "topk_scores": row_scores, "error": None,
            }

    def error_row(self, item: Item, reason: str) -> dict:
        return {"key": item.key, "etag": item.etag, "label": None, "label_id": None, "score": None,
                "topk_labels": None, "topk_ids": None, "topk_scores": None, "error": reason}

    def parts(self) -> dict[str, bytes]:
        return {part_name(self.shard, "parquet"): parquet_bytes(self.ordered_rows(), CLASSIFY_SCHEMA)}


class ArrayHead(Head):
    """Heads that store float16 arrays per shard plus a parquet index (key, shard, row)."""

    def __init__(self, model: LoadedModel, shard: int) -> None:
        super().__init__(model, shard)
        self.arrays: dict[str, dict[int, np.ndarray]] = {}

    def keep(self, name: str, indices: list[int], values: torch.Tensor) -> None:
        store = self.arrays.setdefault(name, {})
        for index, value in zip(indices, values.float().cpu().numpy().astype(np.float16)):
            store[index] = value

    def add_ok(self, indices: list[int], items: list[Item]) -> None:
        for index, item in zip(indices, items):
            self.rows[index] = {"key": item.key, "etag": item.etag, "shard": self.shard, "row": -1, "error": None}

    def error_row(self, item: Item, reason: str) -> dict:
        return {"key": item.key, "etag": item.etag, "shard": self.shard, "row": -1, "error": reason}

    index_schema = INDEX_SCHEMA

    def extra_parts(self) -> dict[str, bytes]:
        return {}

    def parts(self) -> dict[str, bytes]:
        good = [i for i in sorted(self.rows) if self.rows[i]["error"] is None]
        for row, index in enumerate(good):
            self.rows[index]["row"] = row
        out = self.extra_parts()
        out[part_name(self.shard, "parquet")] = parquet_bytes(self.ordered_rows(), self.index_schema)
        for name, values in self.arrays.items():
            stacked = np.stack([values[i] for i in good]) if good else np.zeros((0,), np.float16)
            out[f"{name}/{part_name(self.shard, 'npy')}"] = npy_bytes(stacked)
        return out


class EmbedHead(ArrayHead):
    """CLS token, mean of patch tokens, and optionally every patch token, of the final normalized state."""

    def __init__(self, model: LoadedModel, shard: int, pooling: list[str]) -> None:
        super().__init__(model, shard)
        self.pooling = pooling
        self.prefix = prefix_tokens(model)
        # Readers tell a CLS token from a pooled output (and count prefix tokens) by the index's metadata.
        self.index_schema = INDEX_SCHEMA.with_metadata({"vitbatch.cls_source": cls_source(model),
                                                         "vitbatch.prefix_tokens": str(self.prefix)})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.model.family == "onnx":
            return self.model.module(pixels, self.pooling)
        tokens, cls = final_tokens(self.model, pixels)
        patches = tokens[:, self.prefix:]
        out = {"cls": cls}
        if "mean" in self.pooling:
            out["mean"] = patches.float().mean(dim=1)
        if "patches" in self.pooling:
            out["patches"] = patches
        return {name: out[name] for name in self.pooling}

    def collect(self, indices: list[int], items: list[Item], output: dict[str, torch.Tensor], images=None) -> None:
        self.add_ok(indices, items)
        for name, values in output.items():
            self.keep(name, indices, values)
