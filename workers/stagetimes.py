"""A shard's stage timer: seconds per stage, owned by whoever runs the shard.

`runner.run_shard` (and evaluate, which runs the same path) makes one `StageTimes` and hands
it down: the pipeline adds read, decode and wait time, the device stage its device decode,
`runner.run_items` compute, items and wall time, and the owner the write. The commit marker's
`stats` are `to_json()` of it; the worker's metrics read them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageTimes:
    """Seconds per stage; read and decode are summed over threads, the rest are wall time.
    write_s covers serialising and uploading the shard's files."""

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
