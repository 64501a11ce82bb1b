"""Where a model comes from and what it is, read without loading it (no torch here).

- references: `--model` values (`normalize_model_ref`), `alias:` pointers (`resolve_alias`) and
  the `--config` keys that would load files (`refuse_file_keys`);
- directories: the directory a reference points to (`model_dir`), a finetune or export output's
  model folder (`model_folder`: the job-folder-as-model case) and the files that make up the
  model (`model_files`), whose ETags give the model identity an incremental run compares
  (`model_identity`);
- configs: a directory's config.json (`read_config`) and what submit reads from it (`is_onnx`,
  `label_count`, `model_depth`). What kind of checkpoint a config describes is modelkinds.py's.

Errors are SpecError saying what to write instead; the spec validators hand the message to
pydantic, so `parse_spec` reports it on its field.
"""

from __future__ import annotations

import hashlib
import json
import re

from orchestrator.constants import CHECKPOINTS_DIR, MODEL_CONFIG_FILE, SUCCESS_FILE
from orchestrator.errors import SpecError, StorageError
from orchestrator.published.results import read_record
from orchestrator.store.storage import ObjectInfo, ObjectStore, join, normalize_uri, relative_key

# -- references ------------------------------------------------------------------------------

_HF_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def normalize_model_ref(ref: str) -> str:
    """Validate a model reference; local directories become absolute file:// URIs."""
    ref = ref.strip()
    if not ref:
        raise SpecError("model reference is empty")
    if ref.startswith(("hf:", "timm:")):
        scheme, _, name = ref.partition(":")
        if not name:
            raise SpecError(f"model reference {ref!r} names no model: write {scheme}:<name>")
        if name.startswith(("/", ".", "~")) or name.startswith("file://"):
            return f"{scheme}:{normalize_uri(name.rstrip('/'))}"
        if scheme == "hf" and not _HF_REPO_ID.match(name):
            raise SpecError(f"{ref!r} is neither a Hugging Face repo id (org/name) nor a local directory")
        return ref
    if ref.startswith("alias:"):
        return "alias:" + normalize_uri(ref.split(":", 1)[1])
    if ref.startswith("s3://"):
        return normalize_uri(ref).rstrip("/") + "/"
    if ref.startswith("file://"):
        return normalize_uri(ref).rstrip("/")
    if "://" in ref:
        raise SpecError(f"model reference {ref!r}: use hf:<id>, timm:<name>, a local directory or s3://")
    return normalize_uri(ref.rstrip("/"))


def resolve_alias(ref: str, store: ObjectStore) -> str:
    """`alias:URI` -> the model reference written in the pointer object at URI."""
    if not ref.startswith("alias:"):
        return ref
    pointer = ref.split(":", 1)[1]
    try:
        target = store.read(pointer).decode().strip()
    except StorageError as e:
        raise SpecError(f"model alias {pointer} cannot be read ({e}); a finetune job with --alias writes it") from e
    if not target or target.startswith("alias:"):
        raise SpecError(f"model alias {pointer} holds {target!r}, not a model reference")
    return target


_FILE_KEYS = frozenset({"checkpoint_path", "pretrained", "pretrained_model_name_or_path", "name_or_path",
                        "_name_or_path", "cache_dir"})
_FILE_SUFFIXES = ("_path", "_file", "_dir", "_url")
_CFG_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay")  # fine for mean/std; not for where weights come from
_CFG_SOURCES = frozenset({"file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict"})


def refuse_file_keys(config: dict) -> None:
    """A --config builds a model from scratch; a key that names a file or a download (timm's
    `checkpoint_path`, `pretrained_cfg_overlay={"file": ...}`) would load weights, pickle
    included, from wherever it points, so it is refused (SpecError says which)."""
    named = [key for key in config if key in _FILE_KEYS or str(key).endswith(_FILE_SUFFIXES)]
    for key in _CFG_KEYS:
        cfg = config.get(key)
        if isinstance(cfg, str) or (isinstance(cfg, dict) and _CFG_SOURCES & set(cfg)):
            named.append(key + (f" ({', '.join(sorted(_CFG_SOURCES & set(cfg)))})" if isinstance(cfg, dict) else ""))
    named.sort()
    if named:
        raise SpecError(f"--config may not name files or downloads ({', '.join(named)}): it builds an untrained "
                        "model; to start from weights pass --model with a safetensors directory")


# -- directories -----------------------------------------------------------------------------

def model_dir(ref: str) -> str | None:
    """The directory URI a reference points to, or None for hub names."""
    if ref.startswith(("hf:", "timm:")):
        name = ref.split(":", 1)[1]
        return name if name.startswith("file://") else None
    return ref


def model_folder(output: str, store: ObjectStore) -> str:
    """The folder a finetune or export output's model lives in: its latest succeeded job's folder.

    The job folder itself (`<output>/_jobs/<id>`) holds a copy of that record, whose `model`
    names the folder relative to the prefix: it is its own model folder. A directory that
    holds no vitbatch record is taken as a plain model directory.
    """
    record = read_record(store, join(output, SUCCESS_FILE))
    model = record.model if record else ""
    if not model or output.rstrip("/").endswith("/" + model.strip("/")):
        return output
    return join(output, model)


def model_files(directory: str, store: ObjectStore) -> list[ObjectInfo]:
    """The files that make up the model in `directory`: not a fine-tune's checkpoints/ nor vitbatch's
    own records (names starting with `_` or `.`)."""
    files = []
    for info in store.list(directory):
        key = relative_key(directory, info.uri)
        own_record = any(part.startswith(("_", ".")) and part not in (".", "..") for part in key.split("/"))
        if key.split("/", 1)[0] == CHECKPOINTS_DIR or own_record:
            continue  # unsafe names ('', '.', '..') are kept, for the downloader to refuse
        files.append(info)
    return files


def model_identity(ref: str, store: ObjectStore) -> str:
    """Changes exactly when the model directory's files change; hub names are taken at their word."""
    directory = model_dir(ref)
    if directory is None:
        return "ref:" + ref
    directory = model_folder(directory, store)  # a finetune output: its latest succeeded job's model
    digest = hashlib.sha256(directory.encode() + b"\n")
    for info in model_files(directory, store):
        digest.update(f"{relative_key(directory, info.uri)}\t{info.etag}\n".encode())
    return "sha256:" + digest.hexdigest()


# -- configs ---------------------------------------------------------------------------------

def read_config(ref: str, store: ObjectStore) -> dict | None:
    """config.json of a local or s3:// model directory; None for hub names (checked by the worker)."""
    directory = model_dir(ref)
    if directory is None:
        return None
    directory = model_folder(directory, store)
    try:
        return json.loads(store.read(join(directory, MODEL_CONFIG_FILE)))
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


def model_depth(config: dict) -> int | None:
    """Transformer blocks in an HF (num_hidden_layers) or timm (model_args.depth) config, when it says."""
    for value in (config.get("num_hidden_layers"), (config.get("model_args") or {}).get("depth"), config.get("depth")):
        if isinstance(value, int) and value > 0:
            return value
    return None
