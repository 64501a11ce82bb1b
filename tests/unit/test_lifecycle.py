"""A worker process's start: glibc keeps the activations a forward pass frees."""

import os
import subprocess
import sys

# Four 8 MiB buffers alive at once, then all freed, fifty times: the shape of a forward pass's
# activations. glibc's defaults hand the freed heap back to the kernel each time (it is more than
# twice the largest buffer), so each round faults megabytes in again; kept, the heap is reused.
ROUNDS = """
import resource, sys
import numpy as np
from workers.lifecycle import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    buffers = [np.ones(8 << 20, dtype=np.uint8) for _ in range(4)]
    del buffers
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_is_not_faulted_in_again_every_round():
    tuned, kept = _faults("tune")
    _, default = _faults("default")
    assert tuned == "True"
    assert default > 50 * (4 << 20) // 4096  # the default faults megabytes in every round
    assert kept * 10 < default


def test_the_users_own_malloc_settings_stand():
    tuned, _ = _faults("tune", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert tuned == "False"
