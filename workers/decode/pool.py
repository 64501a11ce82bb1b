"""Decoding past the GIL: processes that write pixels into shared memory.

Reads stay in threads (they wait on the network, which releases the GIL). The
bytes go to a decode process, which decodes, resizes and writes the HxWx3 uint8
result into a slot of a shared-memory block; only the slot's status comes
back, so no pixels are pickled. A SlotBlock is one shard's block of slots: two
shards in flight never wait on each other's slots.

The processes come from a forkserver, not fork: a worker holding CUDA state
cannot fork safely, and Celery's solo and threads pools allow children.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from queue import SimpleQueue

import numpy as np

from workers.decode.preprocess import Decoder
from workers.errors import BadImage, NoSharedMemory

# A decode process keeps this many blocks mapped (the most recent shards').
_ATTACHED_LIMIT = 4
# A decode that takes longer is reported as an error row instead of holding the shard forever
# (a 50-megapixel JPEG decodes in about a second).
DECODE_TIMEOUT_S = 120.0
_attached: OrderedDict[str, tuple[SharedMemory, np.ndarray]] = OrderedDict()


def _block(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The block's slots, mapped once per process. The parent owns the block and unlinks it;
    children of a forkserver share its resource tracker, so attaching here leaks nothing."""
    if name not in _attached:
        shm = SharedMemory(name=name)
        _attached[name] = (shm, np.ndarray(shape, dtype=np.uint8, buffer=shm.buf))
        while len(_attached) > _ATTACHED_LIMIT:
            old, _view = _attached.popitem(last=False)[1]
            del _view
            old.close()
    _attached.move_to_end(name)
    return _attached[name][1]


def _decode_into(block: str, shape: tuple[int, ...], slot: int, data: bytes,
                 decoder: Decoder) -> tuple[str | None, float]:
    """Runs in a decode process: (None, seconds) with the pixels in the slot, or (reason, seconds)."""
    start = time.perf_counter()
    try:
        pixels = decoder.decode(data)
    except BadImage as e:
        return e.reason, time.perf_counter() - start
    _block(block, shape)[slot] = pixels
    return None, time.perf_counter() - start


class DecodePool:
    """A worker's decode processes, started on first use and restarted if one dies."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or len(os.sched_getaffinity(0))  # one per core this worker may use
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._in_flight = 0

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["workers.decode.pool"])
                self._executor = ProcessPoolExecutor(self.processes, mp_context=context)
            return self._executor

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    def has_idle_process(self) -> bool:
        return self._in_flight < self.processes

    def run(self, *args) -> tuple[str | None, float]:
        """_decode_into(*args) in a process; a process that dies (a decoder crash) is replaced and the
        image tried once more, so its neighbours in flight are not lost with it."""
        for _ in range(2):
            executor = self._current()
            with self._lock:
                self._in_flight += 1
            try:
                return executor.submit(_decode_into, *args).result(timeout=DECODE_TIMEOUT_S)
            except BrokenProcessPool:
                self._discard(executor)
            except TimeoutError:
                # The stuck process must not write into the slot after it is reused: end it (the
                # executor has no public handle on its processes); its neighbours are retried.
                for process in list((getattr(executor, "_processes", None) or {}).values()):
                    process.kill()
                self._discard(executor)
                return f"decoding took longer than {DECODE_TIMEOUT_S:.0f} s", DECODE_TIMEOUT_S
            finally:
                with self._lock:
                    self._in_flight -= 1
        return "a decode process died twice while decoding this image", 0.0

    def slot_block(self, slots: int, shape: tuple[int, int, int], decoder: Decoder) -> SlotBlock:
        return SlotBlock(self, slots, shape, decoder)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


class SlotBlock:
    """One shard's slots in shared memory. decode() blocks its (reader) thread until a slot is
    free and the pixels are in it; the consumer calls release() once the batch is on the device."""

    def __init__(self, pool: DecodePool, slots: int, shape: tuple[int, int, int], decoder: Decoder) -> None:
        self.pool, self.decoder = pool, decoder
        self.shape = (slots, *shape)
        self._shm = SharedMemory(create=True, size=int(np.prod(self.shape)))
        try:
            # Reserve the pages now: a sparse block on a full /dev/shm (64 MB in a default
            # container) would kill the worker with SIGBUS at the first write past the room left.
            os.posix_fallocate(self._shm._fd, 0, self._shm.size)  # type: ignore[attr-defined]  # its own fd
        except OSError as e:
            self._shm.close()
            self._shm.unlink()
            raise NoSharedMemory(
                f"/dev/shm has no room for {self._shm.size / 2**20:.0f} MB of decoded pixels ({e.strerror}): "
                "give it more (compose shm_size, a Kubernetes emptyDir with medium Memory) or decode=threads"
            ) from e
        self.pixels = np.ndarray(self.shape, dtype=np.uint8, buffer=self._shm.buf)
        self._free: SimpleQueue[int] = SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)

    def decode(self, data: bytes) -> tuple[int | None, str | None, float]:
        """(slot, None, seconds) or (None, reason, seconds)."""
        slot = self._free.get()
        error, seconds = self.pool.run(self._shm.name, self.shape, slot, data, self.decoder)
        if error is not None:
            self.release(slot)
            return None, error, seconds
        return slot, None, seconds

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        self.pixels = None  # type: ignore[assignment]  # the view goes before the mapping
        try:
            self._shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes when it does
            pass
        self._shm.unlink()

    def __enter__(self) -> SlotBlock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
