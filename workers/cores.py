"""How many cores a worker may use, and a training task's claim on all of them.

A worker process starts with a share of its host's cores for torch (the embedded stack sets
OMP_NUM_THREADS to cores / workers), which is right for inference shards running side by side on
sibling workers. A fine-tune or evaluate job is one task that runs for minutes: with that share it
trained on one of two cores here (1.65x the plain Trainer's wall time). Such a task takes every
core of the process for its duration and gives the share back after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def worker_cores() -> int:
    """The cores this process may run on (its affinity: `--gpus` pinning and containers included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def all_cores() -> Iterator[int]:
    """torch computes on every core of the process inside the block (yields that count)."""
    before = torch.get_num_threads()
    cores = worker_cores()
    torch.set_num_threads(cores)
    try:
        yield cores
    finally:
        torch.set_num_threads(before)
