"""read -> decode -> batch: a shard's items become batches of model-sized pixels, in order.

Reads run in a thread pool ahead of the model (boto3 waits off the GIL). Where an
image is decoded is the shard's `DecodePath`, chosen and sized in `decode_path` and
nowhere else: in the reader threads, in decode processes writing into shared memory
(a `SlotBlock`), or, for plain JPEGs while every process is busy, later on the model's
device (nvJPEG, in workers.compute). A bad item becomes a `Failed` event with its
reason; everything else arrives in `Batch`es. Events come in manifest order within
the read-ahead window, so a shard's rows never depend on arrival order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable
from orchestrator.inputs.manifest import Item
from orchestrator.store.scope import outside_input
from orchestrator.store.storage import ObjectStore
from workers.decode.device import device_decodable
from workers.decode.pool import DecodePool, SlotBlock
from workers.decode.preprocess import Decoder
from workers.errors import BadImage, NoSharedMemory
from workers.loaded import LoadedModel
from workers.stagetimes import StageTimes

log = logging.getLogger(__name__)

KEPT_IMAGE_SIDE = 1024  # the longest side of a decoded image kept for the head (attention overlays draw at 512)


@dataclass
class Decoded:
    """One item on its way to the model: pixels (HxWx3 uint8), or JPEG bytes the device decodes."""

    index: int  # in the shard's manifest
    item: Item
    pixels: np.ndarray | None = None
    raw: bytes | None = None
    tensor: torch.Tensor | None = None  # decoded and resized on the device (CHW float, 0..255)
    image: Image.Image | None = None  # the decoded image, kept only where the head asks (overlays)
    slot: int | None = None  # the block slot `pixels` views; released once the batch is on the device


@dataclass
class Batch:
    decoded: list[Decoded]

    @property
    def indices(self) -> list[int]:
        return [d.index for d in self.decoded]

    @property
    def items(self) -> list[Item]:
        return [d.item for d in self.decoded]


@dataclass
class Failed:
    """An item that becomes an error row: why it was not read or decoded."""

    index: int
    item: Item
    reason: str


class Blobs(Protocol):
    """Items already in hand, by uri: their bytes, or why they were not read. A dict (tar members,
    parquet cells), or evaluate's reader of labeled rows and members by address."""

    def __contains__(self, uri: str, /) -> bool: ...

    def pop(self, uri: str, /) -> bytes | str: ...


def read_ahead(read_concurrency: int, batch_size: int) -> int:
    """Items read ahead of the model."""
    return max(read_concurrency, batch_size) * 2


@dataclass
class DecodePath:
    """Where a shard decodes: threads (no block), decode processes (a block), and maybe the device."""

    decoder: Decoder
    block: SlotBlock | None = None
    device_jpegs: bool = False  # JPEGs go to nvJPEG while every decode process is busy

    @property
    def extra_threads(self) -> int:
        """Reader threads blocked on a decode process must not starve the reads."""
        return self.block.pool.processes if self.block else 0

    def decode(self, index: int, item: Item, data: bytes, keep_image: bool) -> Decoded | Failed:
        if keep_image or self.block is None:
            try:
                image = self.decoder.image(data)
                pixels = self.decoder.resize(image)
            except BadImage as e:
                return Failed(index, item, e.reason)
            if keep_image:  # for an overlay (512 px at most): a full-scale photo would hold 36 MB per item
                image.thumbnail((KEPT_IMAGE_SIDE, KEPT_IMAGE_SIDE))
            return Decoded(index, item, pixels=pixels, image=image if keep_image else None)
        if (self.device_jpegs and not self.block.pool.has_idle_process()
                and device_decodable(data, self.decoder.max_pixels)):
            return Decoded(index, item, raw=data)
        slot, error = self.block.decode(data)[:2]
        if error is not None:
            return Failed(index, item, error)
        return Decoded(index, item, pixels=self.block.pixels[slot], slot=slot)

    def release(self, batch: Batch) -> None:
        for d in batch.decoded:
            if d.slot is not None and self.block is not None:  # a slot is the block's
                self.block.release(d.slot)
                d.slot, d.pixels = None, None


@contextmanager
def decode_path(decode: str, model: LoadedModel, pool: DecodePool, max_pixels: int, *,
                batch_size: int, read_concurrency: int, n_items: int,
                jpeg_decode: str = "exact") -> Iterator[DecodePath]:
    """The one place that picks the decode path and sizes its block.

    auto: nvJPEG plus processes on CUDA; threads on a CPU, whose cores the model needs.
    A block holds the read-ahead window plus one batch, or the shard if it is smaller;
    without room in /dev/shm the shard decodes in threads. `jpeg_decode` is the job's
    --jpeg-decode: `fast` lets the host decoders draft large JPEGs (nvJPEG decodes in full).
    """
    decoder = Decoder(model.prep, max_pixels, fast=jpeg_decode == "fast")
    mode = ("device" if model.device.type == "cuda" else "threads") if decode == "auto" else decode
    if mode == "threads":
        yield DecodePath(decoder)
        return
    slots = min(read_ahead(read_concurrency, batch_size) + batch_size, n_items + 1)
    try:
        block = pool.slot_block(slots, (*model.input_size, 3), decoder)
    except NoSharedMemory as e:
        log.warning("decoding in threads: %s", e)
        yield DecodePath(decoder)
        return
    with block:
        yield DecodePath(decoder, block, device_jpegs=mode == "device")


class ShardPipeline:
    """A shard's items -> `Batch`es of decoded pixels and `Failed` items, in manifest order."""

    def __init__(self, store: ObjectStore, path: DecodePath, times: StageTimes, *, batch_size: int,
                 read_concurrency: int, max_bytes: int, blobs: Blobs | None = None,
                 scope: str | None = None) -> None:
        self.store, self.path = store, path
        self.times = times  # the shard's timer (its owner's): read, decode and wait seconds go here
        self.batch_size, self.read_concurrency, self.max_bytes = batch_size, read_concurrency, max_bytes
        # The job's input root (scope.input_root): an item outside it is an error row, never
        # opened. A shard's manifest lives in the output prefix, so it is checked, not trusted.
        self.scope = scope
        self.blobs: Blobs = blobs or {}  # tar members already in memory: uri -> bytes, or why they were not read

    def _read(self, item: Item) -> bytes | str:
        """The item's bytes, or why not (outside the job's input, missing, too large, unreadable)."""
        if item.uri in self.blobs:
            return self.blobs.pop(item.uri)
        if self.scope is not None and (why := outside_input(item.uri, self.scope)) is not None:
            return why
        try:
            return self.store.read(item.uri, max_bytes=self.max_bytes, within=self.scope)
        except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable) as e:  # retrying cannot help: one row
            return str(e)

    def _load(self, index: int, item: Item, keep_image: bool) -> tuple[Decoded | Failed, float, float]:
        t0 = time.perf_counter()
        data = self._read(item)
        t1 = time.perf_counter()
        if isinstance(data, str):
            return Failed(index, item, data), t1 - t0, 0.0
        return self.path.decode(index, item, data, keep_image), t1 - t0, time.perf_counter() - t1

    def _loaded(self, items: list[Item], keep_image: Callable[[int], bool]) -> Iterator[Decoded | Failed]:
        """Items read and decoded in order, a bounded window in flight (memory stays flat)."""
        threads = self.read_concurrency + self.path.extra_threads
        limit = read_ahead(self.read_concurrency, self.batch_size)
        window: deque[Future] = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="vitbatch-read") as pool:
            for index, item in enumerate(items):
                window.append(pool.submit(self._load, index, item, keep_image(index)))
                if len(window) >= limit:
                    yield self._next(window)
            while window:
                yield self._next(window)

    def _next(self, window: deque[Future]) -> Decoded | Failed:
        t0 = time.perf_counter()
        loaded, read_s, decode_s = window.popleft().result()
        self.times.wait_s += time.perf_counter() - t0
        self.times.read_s += read_s
        self.times.decode_s += decode_s
        return loaded

    def batches(self, items: list[Item], keep_image: Callable[[int], bool] = lambda _: False
                ) -> Iterator[Batch | Failed]:
        """`Failed` as soon as it is known; `Batch`es of batch_size (the last may be smaller)."""
        pending: list[Decoded] = []
        for loaded in self._loaded(items, keep_image):
            if isinstance(loaded, Failed):
                yield loaded
                continue
            pending.append(loaded)
            if len(pending) >= self.batch_size:
                yield Batch(pending)
                pending = []
        if pending:
            yield Batch(pending)
