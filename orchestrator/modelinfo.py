"""What the control plane can learn about a model without loading it (no torch here)."""

from __future__ import annotations

import json

from orchestrator.errors import SpecError, StorageError
from orchestrator.storage import ObjectStore, join


def model_dir(ref: str) -> str | None:
    """The directory URI a reference points to, or None for hub names."""
    if ref.startswith(("hf:", "timm:")):
        name = ref.split(":", 1)[1]
        return name if name.startswith("file://") else None
    return ref


def read_config(ref: str, store: ObjectStore) -> dict | None:
    """config.json of a local or s3:// model directory; None for hub names (checked by the worker)."""
    directory = model_dir(ref)
    if directory is None:
        return None
    try:
        return json.loads(store.read(join(directory, "config.json")))
    except StorageError as e:
        raise SpecError(
            f"model {ref!r} has no readable config.json ({e}): pass a save_pretrained directory, "
            "hf:<repo id> or timm:<name>"
        ) from e
    except ValueError as e:
        raise SpecError(f"model {ref!r}: config.json is not valid JSON ({e})") from e


def label_count(config: dict) -> int | None:
    """Number of classes in an HF (id2label) or timm (num_classes) config."""
    if "id2label" in config:
        return len(config["id2label"])
    for key in ("num_classes", "num_labels"):
        if key in config:
            return int(config[key])
    return None
