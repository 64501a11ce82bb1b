"""What the control plane can learn about a model without loading it (no torch here)."""

from __future__ import annotations

import json

from orchestrator.errors import SpecError, StorageError
from orchestrator.outputs import model_folder
from orchestrator.storage import ObjectInfo, ObjectStore, join, relative_key


def model_dir(ref: str) -> str | None:
    """The directory URI a reference points to, or None for hub names."""
    if ref.startswith(("hf:", "timm:")):
        name = ref.split(":", 1)[1]
        return name if name.startswith("file://") else None
    return ref


def model_files(directory: str, store: ObjectStore) -> list[ObjectInfo]:
    """The files that make up the model in `directory`: not a fine-tune's checkpoints/ nor vitbatch's
    own records (names starting with `_` or `.`)."""
    files = []
    for info in store.list(directory):
        key = relative_key(directory, info.uri)
        own_record = any(part.startswith(("_", ".")) and part not in (".", "..") for part in key.split("/"))
        if key.split("/", 1)[0] == "checkpoints" or own_record:
            continue  # unsafe names ('', '.', '..') are kept, for the downloader to refuse
        files.append(info)
    return files


def read_config(ref: str, store: ObjectStore) -> dict | None:
    """config.json of a local or s3:// model directory; None for hub names (checked by the worker)."""
    directory = model_dir(ref)
    if directory is None:
        return None
    directory = model_folder(directory, store)
    try:
        return json.loads(store.read(join(directory, "config.json")))
    except StorageError as e:
        raise SpecError(
            f"model {ref!r} has no readable config.json ({e}): pass a save_pretrained directory, "
            "hf:<repo id> or timm:<name>"
        ) from e
    except ValueError as e:
        raise SpecError(f"model {ref!r}: config.json is not valid JSON ({e})") from e


ONNX_FORMAT = "onnx"  # config.json "format" of a directory an export job wrote


def is_onnx(config: dict | None) -> bool:
    """An exported ONNX model directory (run on ONNX Runtime), told from its config.json alone."""
    return isinstance(config, dict) and config.get("format") == ONNX_FORMAT


def label_count(config: dict) -> int | None:
    """Number of classes in an HF (id2label) or timm (num_classes) config."""
    if "id2label" in config:
        return len(config["id2label"])
    for key in ("num_classes", "num_labels"):
        if key in config:
            return int(config[key])
    return None
