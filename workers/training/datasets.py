"""Labeled images as a torch Dataset: one screening pass, lazy decode, train and eval transforms.

The eval transform is the inference pipeline's own resize and normalize, so the
validation accuracy during training is what classify and evaluate will measure. It is
deterministic, so where it is also the training transform (`--augment none`) and for the
validation set, an image's model-sized uint8 pixels are kept after its first epoch (up to
CACHE_BYTES per dataset): later epochs neither read nor decode it again. Without that, every
epoch re-read and re-decoded every image on the training thread, and a small model waited on it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from orchestrator.errors import ObjectNotFound, ObjectTooLarge
from orchestrator.inputs.labeledsources import LabeledItem
from workers.context import WorkerContext
from workers.decode.imaging import decode_rgb
from workers.decode.labeledcells import ContainerReader, addressed
from workers.decode.preprocess import Preprocess, resize_image
from workers.errors import BadImage

CACHE_BYTES = 2 << 30  # per dataset: 14,000 images at 224x224, all of them at the digits' 32x32


class EvalTransform:
    """The inference pipeline's resize to model-sized uint8, then normalize to a float CHW tensor."""

    def __init__(self, prep: Preprocess) -> None:
        self.prep = prep
        self.mean = torch.tensor(prep.mean).view(3, 1, 1) * 255
        self.std = torch.tensor(prep.std).view(3, 1, 1) * 255

    def pixels(self, img) -> np.ndarray:
        return resize_image(img, self.prep)  # the same resize as every inference decode path

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() - self.mean) / self.std  # PIL arrays are read-only

    def __call__(self, img) -> torch.Tensor:
        return self.tensor(self.pixels(img))


class LabeledImages(torch.utils.data.Dataset):
    """Reads and decodes each image when Trainer asks for it (once, under an EvalTransform);
    only screened items come here."""

    def __init__(self, items: list[LabeledItem], label_ids: dict[str, int], ctx: WorkerContext, transform,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.items, self.label_ids, self.ctx, self.transform = items, label_ids, ctx, transform
        self.reader = ContainerReader(ctx.store, ctx.settings)  # rows of parquet files, members of tars
        self.kept: dict[int, np.ndarray] = {}
        self.cache_left = cache_bytes if isinstance(transform, EvalTransform) else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self._pixel_values(index), "labels": self.label_ids[self.items[index].label]}

    def _pixel_values(self, index: int) -> torch.Tensor:
        if not isinstance(self.transform, EvalTransform):  # random augmentation: a new view every epoch
            return self.transform(_decode(self.items[index], self.ctx, self.reader))
        pixels = self.kept.get(index)
        if pixels is None:
            pixels = self.transform.pixels(_decode(self.items[index], self.ctx, self.reader))
            if pixels.nbytes <= self.cache_left:
                self.kept[index] = pixels
                self.cache_left -= pixels.nbytes
        return self.transform.tensor(pixels)


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

    evaluate = EvalTransform(prep)
    size, interpolation = prep.crop or prep.size, _INTERPOLATION.get(prep.resample, "bilinear")
    if augment == "none":
        return evaluate, evaluate
    if augment == "basic":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=T.InterpolationMode(interpolation)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(prep.mean, prep.std)]), evaluate
    from timm.data import create_transform

    return create_transform((3, *size), is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                            mean=prep.mean, std=prep.std, interpolation=interpolation), evaluate
