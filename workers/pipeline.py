"""fetch -> decode -> resize -> batch -> device, overlapped.

Reads run in a thread pool ahead of the model (boto3 waits off the GIL).
Decoding happens where the job's `decode` says: in those threads, in a
process pool writing into shared memory (a `Lane`), or for plain JPEGs on
the model's device (nvJPEG), which takes what the processes have no room
for. The model runs on the caller's thread, one shard at a time per model
(the model's lock), so a second shard in flight reads and decodes while
this one computes. Results come back in manifest order, so a shard's rows
never depend on arrival order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable
from orchestrator.manifest import Item
from orchestrator.scope import outside_input
from orchestrator.storage import ObjectStore
from workers.decodepool import DecodeRecipe, Lane
from workers.devicedecode import decode_batch, device_decodable, resize_batch
from workers.errors import BadImage
from workers.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    item: Item
    pixels: np.ndarray | None
    error: str | None
    read_s: float = 0.0
    decode_s: float = 0.0
    preview: Image.Image | None = None  # the decoded image, kept only when a head asks (overlays)
    slot: int | None = None  # the lane slot `pixels` views; freed once the batch is on the device
    raw: bytes | None = None  # a JPEG left for the device to decode
    tensor: torch.Tensor | None = None  # decoded and resized on the device (CHW float, 0..255)


@dataclass
class StageTimes:
    """Seconds per stage; read and decode are summed over threads, the rest are wall time."""

    read_s: float = 0.0
    decode_s: float = 0.0
    compute_s: float = 0.0
    wait_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    device_decode_s: float = 0.0
    items: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: round(v, 4) for k, v in vars(self).items() if isinstance(v, float)}
        out["items"] = self.items
        out["images_per_s"] = round(self.items / self.wall_s, 2) if self.wall_s else 0.0
        return out


class ShardPipeline:
    def __init__(self, model: LoadedModel, store: ObjectStore, *, batch_size: int, read_concurrency: int,
                 max_bytes: int, max_pixels: int, blobs: dict[str, bytes | str] | None = None,
                 lane: Lane | None = None, device_jpegs: bool = False, scope: str | None = None) -> None:
        self.model, self.store = model, store
        # The job's input root (scope.input_root): an item outside it is an error row, never
        # opened. A shard's manifest lives in the output prefix, so it is checked, not trusted.
        self.scope = scope
        self.blobs = blobs or {}  # tar members already in memory: uri -> bytes, or why they were not read
        self.batch_size, self.read_concurrency = batch_size, read_concurrency
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.lane, self.device_jpegs = lane, device_jpegs
        self.recipe = lane.recipe if lane else DecodeRecipe.for_model(model.prep, max_pixels)  # one recipe per shard
        self.device_decode_s = 0.0
        prep = model.prep
        self._mean = torch.tensor(prep.mean, device=model.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(prep.std, device=model.device).view(1, 3, 1, 1) * 255

    # -- stage 1+2: read, then decode (in this thread, a decode process, or later on the device) ----
    def _load(self, item: Item, keep_preview: bool = False) -> Decoded:
        t0 = time.perf_counter()
        try:
            data = self.blobs.pop(item.uri) if item.uri in self.blobs else self._read(item)
        except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable) as e:  # retrying cannot help: one row
            return Decoded(item, None, str(e), read_s=time.perf_counter() - t0)
        if isinstance(data, str):
            return Decoded(item, None, data, read_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        if keep_preview or self.lane is None:
            return self._decode_here(item, data, keep_preview, t1 - t0)
        if (self.device_jpegs and not self.lane.pool.has_idle_process()
                and device_decodable(data, self.max_pixels)):
            return Decoded(item, None, None, t1 - t0, time.perf_counter() - t1, raw=data)
        slot, error, seconds = self.lane.decode(data)
        pixels = self.lane.pixels[slot] if slot is not None else None
        return Decoded(item, pixels, error, t1 - t0, seconds, slot=slot)

    def _read(self, item: Item) -> bytes | str:
        """The item's bytes, or why it is not the job's to read (outside its input)."""
        if self.scope is not None and (why := outside_input(item.uri, self.scope)) is not None:
            return why
        return self.store.read(item.uri, max_bytes=self.max_bytes, within=self.scope)

    def _decode_here(self, item: Item, data: bytes, keep_preview: bool, read_s: float) -> Decoded:
        t1 = time.perf_counter()
        try:
            img = self.recipe.image(data)
            pixels = self.recipe.resize(img)
        except BadImage as e:
            return Decoded(item, None, e.reason, read_s, time.perf_counter() - t1)
        return Decoded(item, pixels, None, read_s, time.perf_counter() - t1, img if keep_preview else None)

    @staticmethod
    def window(read_concurrency: int, batch_size: int) -> int:
        """Items read ahead of the model; a lane needs this many slots plus one batch."""
        return max(read_concurrency, batch_size) * 2

    def decoded(self, items: list[Item], pool: ThreadPoolExecutor,
                keep_preview: Callable[[int], bool] = lambda _: False) -> Iterator[Decoded]:
        """Items decoded in order, with a bounded window in flight (memory stays flat)."""
        window: deque[Future] = deque()
        limit = self.window(self.read_concurrency, self.batch_size)
        for index, item in enumerate(items):
            window.append(pool.submit(self._load, item, keep_preview(index)))
            if len(window) >= limit:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    # -- stage 3: device ----------------------------------------------------------------------
    def to_device(self, decoded: list[Decoded]) -> torch.Tensor:
        host = [d.pixels for d in decoded if d.tensor is None]
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
        batch = batch.sub_(self._mean).div_(self._std)
        return batch.to(self.model.dtype) if self.model.device.type == "cuda" else batch

    def decode_on_device(self, head, batch: list[tuple[int, Decoded]]) -> list[tuple[int, Decoded]]:
        """nvJPEG for the batch's raw JPEGs in one call; if it refuses any, those go the CPU way,
        which turns a bad one into an error row with its reason."""
        raws = [d for _, d in batch if d.raw is not None]
        if not raws:
            return batch
        t0 = time.perf_counter()
        try:
            for d, tensor in zip(raws, resize_batch(decode_batch([d.raw for d in raws], self.model.device),
                                                    self.recipe)):
                d.tensor, d.raw = tensor, None
        except RuntimeError as e:
            log.info("device decode refused a batch (%s); decoding its JPEGs on the CPU", e)
        kept = []
        for index, d in batch:
            if d.raw is not None:
                try:
                    d.pixels = self.recipe.decode(d.raw)
                except BadImage as e:
                    head.add_error(index, d.item, e.reason)
                    continue
                d.raw = None
            kept.append((index, d))
        self.device_decode_s += time.perf_counter() - t0
        return kept

    def compute(self, head: Callable, pixels: torch.Tensor):
        autocast = self.model.device.type == "cpu" and self.model.dtype != torch.float32
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.model.dtype, enabled=autocast):
            return head(pixels)

    def _compute_into(self, head, batch: list[tuple[int, Decoded]]) -> None:
        """Run one batch; on device out-of-memory halve the batch size (for good) and go again."""
        try:
            output = self.compute(head, self.to_device([d for _, d in batch]))
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(batch) // 2)
            log.warning("out of device memory at batch %d; continuing with batch size %d", len(batch), self.batch_size)
            for start in range(0, len(batch), self.batch_size):
                self._compute_into(head, batch[start:start + self.batch_size])
            return
        indices, decoded = [i for i, _ in batch], [d for _, d in batch]
        if any(d.preview is not None for d in decoded):
            head.add(indices, [d.item for d in decoded], output, [d.preview for d in decoded])
        else:
            head.add(indices, [d.item for d in decoded], output)

    # -- the whole shard -----------------------------------------------------------------------
    def run(self, items: list[Item], head, on_progress: Callable[[int, int], None] | None = None) -> StageTimes:
        """Feed every item of the shard to `head` (results or error rows); returns stage timings."""
        times = StageTimes()
        start = time.perf_counter()
        batch: list[tuple[int, Decoded]] = []
        done = 0

        def flush() -> None:
            nonlocal done
            if not batch:
                return
            t0 = time.perf_counter()
            with self.model.lock:  # one shard at a time on the device; others keep reading
                ready = self.decode_on_device(head, batch)
                for start in range(0, len(ready), self.batch_size):
                    self._compute_into(head, ready[start:start + self.batch_size])
            times.compute_s += time.perf_counter() - t0
            done += len(batch)
            for _, d in batch:
                if d.slot is not None:
                    self.lane.release(d.slot)
            batch.clear()
            if on_progress:
                on_progress(done, len(items))

        keep_preview = getattr(head, "wants_preview", lambda _: False)
        # Threads blocked on a decode process must not starve the reads.
        threads = self.read_concurrency + (self.lane.pool.processes if self.lane else 0)
        with ThreadPoolExecutor(threads, thread_name_prefix="vitbatch-read") as pool:
            t_wait = time.perf_counter()
            for index, decoded in enumerate(self.decoded(items, pool, keep_preview)):
                times.wait_s += time.perf_counter() - t_wait
                times.read_s += decoded.read_s
                times.decode_s += decoded.decode_s
                if decoded.error is not None:
                    head.add_error(index, decoded.item, decoded.error)
                    done += 1
                else:
                    batch.append((index, decoded))
                    if len(batch) >= self.batch_size:
                        flush()
                t_wait = time.perf_counter()
            flush()
        if on_progress:
            on_progress(done, len(items))
        times.items = len(items)
        times.device_decode_s = self.device_decode_s
        times.wall_s = time.perf_counter() - start
        return times
