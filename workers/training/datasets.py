"""Labeled images as a torch Dataset: one screening pass, lazy decode, train and eval transforms.

The eval transform is the inference pipeline's own resize and normalize, so the
validation accuracy during training is what classify and evaluate will measure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from orchestrator.errors import ObjectNotFound, ObjectTooLarge
from orchestrator.labeledsources import LabeledItem
from workers.context import WorkerContext
from workers.decode.imaging import decode_rgb
from workers.decode.labeledcells import ContainerReader, addressed
from workers.decode.preprocess import Preprocess, resize_image
from workers.errors import BadImage


class LabeledImages(torch.utils.data.Dataset):
    """Reads and decodes each image when Trainer asks for it; only screened items come here."""

    def __init__(self, items: list[LabeledItem], label_ids: dict[str, int], ctx: WorkerContext, transform) -> None:
        self.items, self.label_ids, self.ctx, self.transform = items, label_ids, ctx, transform
        self.reader = ContainerReader(ctx.store, ctx.settings)  # rows of parquet files, members of tars

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"pixel_values": self.transform(_decode(item, self.ctx, self.reader)),
                "labels": self.label_ids[item.label]}


def _decode(item: LabeledItem, ctx: WorkerContext, reader: ContainerReader | None = None):
    if addressed(item.uri):  # an image inside a parquet file or a tar
        data = (reader or ContainerReader(ctx.store, ctx.settings)).read(item.uri)
        if isinstance(data, str):
            raise BadImage(data)
    else:
        data = ctx.store.read(item.uri, max_bytes=ctx.settings.max_object_bytes)
    return decode_rgb(data, max_pixels=ctx.settings.max_pixels)


def screen(items: list[LabeledItem], ctx: WorkerContext) -> tuple[list[LabeledItem], list[dict]]:
    """(decodable items, [{key, reason}] of the rest): one decode pass, so training never meets a bad image."""

    reader = ContainerReader(ctx.store, ctx.settings)

    def check(item: LabeledItem) -> str | None:
        try:
            _decode(item, ctx, reader)
        except (BadImage, ObjectNotFound, ObjectTooLarge) as e:
            return getattr(e, "reason", None) or str(e)
        return None

    with ThreadPoolExecutor(8, thread_name_prefix="vitbatch-screen") as pool:
        reasons = list(pool.map(check, items))
    good = [item for item, reason in zip(items, reasons) if reason is None]
    return good, [{"key": item.key, "reason": r} for item, r in zip(items, reasons) if r is not None]


_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def transforms(prep: Preprocess, augment: str):
    """(train, eval) PIL -> tensor; eval is exactly the inference pipeline's resize and normalize."""
    from torchvision import transforms as T

    mean, std = torch.tensor(prep.mean).view(3, 1, 1) * 255, torch.tensor(prep.std).view(3, 1, 1) * 255

    def evaluate(img) -> torch.Tensor:
        pixels = resize_image(img, prep)  # the same resize as every inference decode path
        return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() - mean) / std  # PIL arrays are read-only

    size, interpolation = prep.crop or prep.size, _INTERPOLATION.get(prep.resample, "bilinear")
    if augment == "none":
        return evaluate, evaluate
    if augment == "basic":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=T.InterpolationMode(interpolation)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(prep.mean, prep.std)]), evaluate
    from timm.data import create_transform

    return create_transform((3, *size), is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                            mean=prep.mean, std=prep.std, interpolation=interpolation), evaluate
