"""Per-kind compute: what a batch of normalized pixels becomes, and the files a shard writes.

A head is a pure `forward(pixels)` plus a collector: `collect` turns a batch's output into
rows (and arrays), `error` records an item that never reached the model, and `parts()`
serialises the shard. Errors arrive before their neighbours' batches, so a head keys
everything by the item's index in the shard and sorts when the shard ends. The head a shard
needs comes from `jobheads.for_job`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from orchestrator.constants import part_name
from orchestrator.inputs.manifest import Item
from workers.embedparquet import vectors_part
from workers.errors import ModelLoadError
from workers.families import Onnx
from workers.loaded import LoadedModel
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
    scores, ids = model.family.logits(pixels).float().softmax(dim=-1).topk(k, dim=-1)
    return scores.cpu(), ids.cpu()  # .cpu() waits for the device


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class Head:
    """forward (pure) + collect/error (rows by manifest index); `parts()`: file name -> bytes."""

    passthrough = None  # parquetshards.Passthrough: input columns copied into the rows (--keep-columns)

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

    def parts(self) -> dict[str, bytes]:
        """The shard's files: name (under the job's folder) -> bytes."""
        raise NotImplementedError

    def ordered_rows(self) -> list[dict]:
        return [self.rows[i] for i in sorted(self.rows)]

    def table_bytes(self, schema: pa.Schema) -> bytes:
        """The shard's rows as parquet, with the kept input columns where the job asked for them."""
        rows = self.ordered_rows()
        if self.passthrough is not None:
            rows, schema = self.passthrough.merge(rows, schema)
        return parquet_bytes(rows, schema)

    @property
    def errors(self) -> int:
        return sum(1 for row in self.rows.values() if row["error"] is not None)


class ClassifyHead(Head):
    """Softmax top-k over the model's labels."""

    def __init__(self, model: LoadedModel, shard: int, top_k: int) -> None:
        super().__init__(model, shard)
        if not model.family.has_classifier:
            raise ModelLoadError(f"model {model.ref} is a {model.family.name} without a trained classifier: "
                                 "classify would write a random head's labels; run embed, zero-shot classify "
                                 "with --labels (CLIP, SigLIP), or finetune it first")
        if top_k > len(model.id2label):
            raise ModelLoadError(f"top_k={top_k} is larger than the model's {len(model.id2label)} labels")
        self.top_k = top_k

    @property
    def id2label(self) -> dict[int, str]:
        return self.model.id2label

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k(self.model, pixels, self.top_k)

    def collect(self, indices: list[int], items: list[Item], output, images=None) -> None:
        scores, ids = output
        labels = self.id2label
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
        return {part_name(self.shard, "parquet"): self.table_bytes(CLASSIFY_SCHEMA)}


class ZeroShotHead(ClassifyHead):
    """Classify rows from an image-text model: the labels' prompts are encoded once per loaded model,
    and each image's labels are ranked by the model's own image-text scores (families.HFDualEncoder)."""

    def __init__(self, model: LoadedModel, shard: int, top_k: int, labels: list[str], prompt: str) -> None:
        family = model.family
        if not family.zero_shot:
            raise ModelLoadError(f"model {model.ref} is a {family.name}: zero-shot --labels needs an image-text "
                                 "model (CLIPModel, SiglipModel) with its text tower and tokenizer")
        self.labels = dict(enumerate(labels))
        Head.__init__(self, model, shard)
        if top_k > len(labels):
            raise ModelLoadError(f"top_k={top_k} is larger than the {len(labels)} --labels")
        self.top_k = top_k
        self.text = text_embeddings(model, tuple(prompt.format(label) for label in labels))

    @property
    def id2label(self) -> dict[int, str]:
        return self.labels

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        family = self.model.family
        scores = family.image_text_scores(family.embed(pixels).image, self.text.to(pixels.device))
        scores, ids = scores.float().topk(self.top_k, dim=-1)
        return scores.cpu(), ids.cpu()


def text_embeddings(model: LoadedModel, prompts: tuple[str, ...]) -> torch.Tensor:
    """The prompts' text embeddings, computed once per loaded model and prompt set (every shard's head
    on this worker shares them), in fp32 outside autocast."""
    cache = model.text_cache
    if prompts not in cache:
        with model.lock, torch.inference_mode():
            cache[prompts] = model.family.text_embeddings(list(prompts)).float()
    return cache[prompts]


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
        out[part_name(self.shard, "parquet")] = self.table_bytes(self.index_schema)
        for name, values in self.arrays.items():
            stacked = np.stack([values[i] for i in good]).astype(np.float16, copy=False) if good else \
                np.zeros((0,), np.float16)
            out[f"{name}/{part_name(self.shard, 'npy')}"] = npy_bytes(stacked)
        return out


def unit_length(values: torch.Tensor) -> torch.Tensor:
    values = values.float()
    return values / values.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class EmbedHead(ArrayHead):
    """The model's image embedding (`cls`), its unprojected pooled output (`pooled`), the mean of the
    final normalized patch tokens (`mean`) and every patch token (`patches`); see workers/families.py."""

    def __init__(self, model: LoadedModel, shard: int, pooling: Sequence[str], normalize: bool = False,
                 parquet_vectors: str = "off") -> None:
        super().__init__(model, shard)
        self.pooling, self.normalize, self.parquet_vectors = pooling, normalize, parquet_vectors
        family = model.family
        self.prefix = family.prefix_tokens
        if "pooled" in pooling and not family.has_pooled:
            raise ModelLoadError(f"model {model.ref} ({family.name}) has no pooled output apart from its `cls` "
                                 "embedding: drop `pooled` from --pooling")
        # Readers tell a CLS token from a pooled or projected output (and count prefix tokens) by the metadata.
        self.index_schema = INDEX_SCHEMA.with_metadata({
            "vitbatch.cls_source": family.cls_source, "vitbatch.prefix_tokens": str(self.prefix),
            "vitbatch.arrays": json.dumps({name: self.describe(name) for name in pooling}, sort_keys=True),
        })

    def describe(self, name: str) -> dict:
        """What one stored array is, for downstream tools (written into the index's metadata)."""
        source = {"cls": self.model.family.cls_source, "pooled": "pooled", "mean": "mean_of_patch_tokens",
                  "patches": "patch_tokens"}[name]
        return {"source": source, "projected": name == "cls" and source == "projected",
                "normalized": self.normalize and name != "patches", "dtype": "float16",
                "family": self.model.family.name, "model_fingerprint": self.model.fingerprint}

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        family = self.model.family
        if isinstance(family, Onnx):  # the export's graph computes each array
            out = family.outputs(pixels, self.pooling)
        else:
            embedded = family.embed(pixels)
            patches = embedded.tokens[:, self.prefix:]
            def pooled() -> torch.Tensor:
                assert embedded.pooled is not None  # __init__ refuses `pooled` to a family without one
                return embedded.pooled

            every = {"cls": lambda: embedded.image, "pooled": pooled,
                     "mean": lambda: patches.float().mean(dim=1), "patches": lambda: patches}
            out = {name: every[name]() for name in self.pooling}
        if self.normalize:  # unit length in fp32, before the fp16 cast (patch tokens are left as they are)
            out = {name: unit_length(v) if name != "patches" else v for name, v in out.items()}
        return out
    def collect(self, indices: list[int], items: list[Item], output: dict[str, torch.Tensor], images=None) -> None:
        self.add_ok(indices, items)
        for name, values in output.items():
            self.keep(name, indices, values)

    def keep(self, name: str, indices: list[int], values: torch.Tensor) -> None:
        if self.parquet_vectors != "float32":
            return super().keep(name, indices, values)
        store = self.arrays.setdefault(name, {})  # float32 for the parquet vectors; the npy is cast to float16
        for index, value in zip(indices, values.float().cpu().numpy(), strict=True):
            store[index] = value
        return None

    def extra_parts(self) -> dict[str, bytes]:
        """vectors/part-NNNNN.parquet (--parquet-vectors): key + one vector column per array, good rows in order."""
        if self.parquet_vectors == "off":
            return {}
        good = [i for i in sorted(self.rows) if self.rows[i]["error"] is None]
        arrays = {name: np.stack([values[i] for i in good]) if good else np.zeros((0, 0), np.float32)
                  for name, values in self.arrays.items()}
        if not good:  # no vectors to size the columns by: the file holds no rows
            arrays = {}
        return vectors_part(self.shard, [self.rows[i]["key"] for i in good], arrays, self.parquet_vectors,
                            self.index_schema.metadata)
