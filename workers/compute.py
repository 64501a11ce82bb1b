"""batch -> device -> forward: a `Batch` of decoded items becomes a head's output.

JPEGs left for the device are decoded there first (nvJPEG, one call a batch; any it
refuses go the CPU way, and a bad one becomes a `Failed` with its reason). Pixels
cross to the device as uint8 and are normalized there. On device out-of-memory the
batch size halves, for good, and the batch goes again in halves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from orchestrator.inputs.manifest import Item
from workers.decode.device import decode_batch, resize_batch
from workers.decode.preprocess import Decoder
from workers.errors import BadImage
from workers.loaded import LoadedModel
from workers.pipeline import Batch, Decoded, Failed
from workers.stagetimes import StageTimes

log = logging.getLogger(__name__)


@dataclass
class Computed:
    """A head's output for these items (in batch order), with the images it asked to keep."""

    indices: list[int]
    items: list[Item]
    output: object
    images: list[Image.Image | None]


class DeviceStage:
    def __init__(self, model: LoadedModel, decoder: Decoder, batch_size: int, times: StageTimes) -> None:
        self.model, self.decoder, self.batch_size = model, decoder, batch_size
        self.times = times  # the shard's timer (its owner's): device decode seconds go here
        prep = model.prep
        self._mean = torch.tensor(prep.mean, device=model.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(prep.std, device=model.device).view(1, 3, 1, 1) * 255

    def run(self, batch: Batch, forward: Callable[[torch.Tensor], object]) -> Iterator[Computed | Failed]:
        """The batch's outputs (in one or more pieces) and any item the device could not decode."""
        ready, failed = self._decode_on_device(batch.decoded)
        yield from failed
        for start in range(0, len(ready), self.batch_size):
            yield from self._forward(ready[start:start + self.batch_size], forward)

    def _decode_on_device(self, decoded: list[Decoded]) -> tuple[list[Decoded], list[Failed]]:
        raws = [d for d in decoded if d.raw is not None]
        if not raws:
            return decoded, []
        t0 = time.perf_counter()
        try:
            images = decode_batch([d.raw for d in raws if d.raw is not None], self.model.device)
            for d, tensor in zip(raws, resize_batch(images, self.decoder.prep)):
                d.tensor, d.raw = tensor, None
        except RuntimeError as e:
            log.info("device decode refused a batch (%s); decoding its JPEGs on the CPU", e)
        ready, failed = [], []
        for d in decoded:
            if d.raw is not None:
                try:
                    d.pixels, d.raw = self.decoder.decode(d.raw), None
                except BadImage as e:
                    failed.append(Failed(d.index, d.item, e.reason))
                    continue
            ready.append(d)
        self.times.device_decode_s += time.perf_counter() - t0
        return ready, failed

    def to_device(self, decoded: list[Decoded]) -> torch.Tensor:
        """Normalized NCHW pixels on the model's device, in the batch's order."""
        host = [d.pixels for d in decoded if d.tensor is None and d.pixels is not None]  # every other one
        batch = None
        if host:
            if self.model.device.type == "cuda":
                # Stack straight into pinned memory (torch's caching host allocator reuses the block
                # once its copy has finished) and copy without blocking: one host copy, not two.
                staging = torch.empty((len(host), *host[0].shape), dtype=torch.uint8, pin_memory=True)
                np.stack(host, out=staging.numpy())
                batch = staging.to(self.model.device, non_blocking=True)
            else:
                batch = torch.from_numpy(np.stack(host))
            # Normalize on the device: uint8 crosses the bus, not float32 (4x less traffic).
            batch = batch.permute(0, 3, 1, 2).float()
        if len(host) < len(decoded):  # some were decoded on the device: put them back in order
            rows = iter(batch if batch is not None else ())
            batch = torch.stack([d.tensor if d.tensor is not None else next(rows) for d in decoded])
        assert batch is not None  # a batch holds one item at least
        batch = batch.sub_(self._mean).div_(self._std)
        return batch.to(self.model.dtype) if self.model.device.type == "cuda" else batch

    def _forward(self, decoded: list[Decoded], forward: Callable) -> Iterator[Computed]:
        try:
            output = self.compute(forward, self.to_device(decoded))
        except torch.OutOfMemoryError:
            if len(decoded) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(decoded) // 2)
            log.warning("out of device memory at batch %d; continuing with batch size %d",
                        len(decoded), self.batch_size)
            for start in range(0, len(decoded), self.batch_size):
                yield from self._forward(decoded[start:start + self.batch_size], forward)
            return
        yield Computed([d.index for d in decoded], [d.item for d in decoded], output, [d.image for d in decoded])

    def compute(self, forward: Callable, pixels: torch.Tensor):
        """forward(pixels) under the model's precision. A static-shape compiled model gets every
        batch at the one size it was compiled for: a short batch is padded with zero images and
        the outputs cut back to its rows (a ViT computes each image on its own)."""
        rows = pixels.shape[0]
        if self.model.static_batch and rows < self.batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros((self.batch_size - rows, *pixels.shape[1:]))])
        autocast = self.model.device.type == "cpu" and self.model.dtype != torch.float32
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.model.dtype, enabled=autocast):
            output = forward(pixels)
        return output if pixels.shape[0] == rows else first_rows(output, rows, pixels.shape[0])


def first_rows(output, rows: int, padded: int):
    """`output` (a tensor, or tuples, lists and dicts of them) cut to its first `rows` images:
    every tensor whose first dimension is the padded batch."""
    if isinstance(output, torch.Tensor):
        return output[:rows] if output.dim() and output.shape[0] == padded else output
    if isinstance(output, dict):
        return type(output)({k: first_rows(v, rows, padded) for k, v in output.items()})
    if isinstance(output, (tuple, list)):
        return type(output)(first_rows(v, rows, padded) for v in output)
    return output
