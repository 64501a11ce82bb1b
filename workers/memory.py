"""What a worker process sets up once at its start, outside any task."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: buffers below it come from the heap
TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed heap instead of handing it back after every batch
TOP_PAD = 64 << 20
USER_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Make glibc keep a forward pass's freed activations for the next one.

    By default glibc hands large freed buffers back to the kernel (munmap, or trimming the heap),
    so every forward pass faults its activations in again, page by page, zero-filled: a worker
    classifying 500 JPEGs with ViT-Tiny took 4.6 million page faults this way and 182,000 with
    these settings, and the model ran 1.14x faster on one thread (bench/RESULTS.md; the same
    numbers come out: the arithmetic is unchanged). False where the C library is not glibc or
    the user set glibc's own MALLOC_*_ variables (their choice stands)."""
    if any(name in os.environ for name in USER_MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: another allocator, left alone
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))


# -- the cyclic garbage collector ------------------------------------------------------------------
# A worker builds its long-lived heap twice: at start (Celery, torch) and when it loads a model
# (transformers and its imports, the modules). That heap is about 800,000 tracked objects, and
# left alone the collector walks it over and over while it grows, then at every full collection
# and once more as the process exits. Loading ViT-Tiny cold took 9.4 s with the collector and
# 7.0 s without it; the exit after it, 2.6 s and 0.1 s once the heap was frozen (bench/RESULTS.md).
# Reference counting still frees everything as before: only cycles wait for the collector.

@contextmanager
def long_lived() -> Iterator[None]:
    """Build objects that live as long as the process (a cached model) without collections,
    then freeze them. Cycles among frozen objects are never collected: whoever drops one of
    them calls `release_frozen` (the model cache does, when it evicts a model)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


_start = ExitStack()  # the collector's pause over a worker's start, between two Celery signals


def pause_collector(**_) -> None:
    """At the worker's start (celeryd_init, before the task modules and torch are imported)."""
    _start.enter_context(long_lived())


def settle_heap(**_) -> None:
    """When the worker is ready: what its start built lives as long as the process (frozen)."""
    _start.close()


def release_frozen() -> None:
    """Put frozen objects back under the collector and collect now: an evicted model's cycles
    (and the memory they hold) go at once; what is still in use is frozen again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
