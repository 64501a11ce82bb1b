"""Per-kind compute: what a batch of normalized pixels becomes, and the rows it yields."""

from __future__ import annotations

import pyarrow as pa
import torch

from workers.models import LoadedModel

CLASSIFY_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("label", pa.string()), ("label_id", pa.int32()),
    ("score", pa.float32()), ("topk_labels", pa.list_(pa.string())), ("topk_ids", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())), ("error", pa.string()),
])


def logits(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    if model.family == "hf":
        return model.module(pixel_values=pixels).logits
    return model.module(pixels)


class ClassifyHead:
    """Softmax top-k over the model's labels."""

    schema = CLASSIFY_SCHEMA

    def __init__(self, model: LoadedModel, top_k: int) -> None:
        if top_k > len(model.id2label):
            from workers.errors import ModelLoadError

            raise ModelLoadError(f"top_k={top_k} is larger than the model's {len(model.id2label)} labels")
        self.model, self.top_k = model, top_k

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits(self.model, pixels).float().softmax(dim=-1)
        scores, ids = probs.topk(self.top_k, dim=-1)
        return scores.cpu(), ids.cpu()

    def rows(self, keys: list[tuple[str, str]], output: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        scores, ids = output
        labels = self.model.id2label
        out = []
        for (key, etag), row_scores, row_ids in zip(keys, scores.tolist(), ids.tolist()):
            out.append({
                "key": key, "etag": etag, "label": labels[row_ids[0]], "label_id": row_ids[0],
                "score": row_scores[0], "topk_labels": [labels[i] for i in row_ids], "topk_ids": row_ids,
                "topk_scores": row_scores, "error": None,
            })
        return out

    @staticmethod
    def error_row(key: str, etag: str, reason: str) -> dict:
        return {"key": key, "etag": etag, "label": None, "label_id": None, "score": None,
                "topk_labels": None, "topk_ids": None, "topk_scores": None, "error": reason}
