"""Model files: where a reference's directory is (s3:// ones downloaded into a content-keyed
cache) and whether loading it is safe (no code shipped with the model, no pickle)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from orchestrator.config import Settings
from orchestrator.constants import MODEL_CONFIG_FILE
from orchestrator.jobspec.modelrefs import model_dir, model_files, model_folder
from orchestrator.store.storage import ObjectStore, relative_key
from workers.errors import ModelLoadError, UnsafeCheckpoint

_PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.pth.tar", "*.ckpt", "*.pkl")  # torch.save / pickle checkpoints


def local_model_dir(ref: str, store: ObjectStore, settings: Settings) -> Path | None:
    """A local directory for the reference (s3:// directories are downloaded once), or None for hub names.

    A fine-tune output resolves to the model of its latest succeeded job.
    """
    directory = model_dir(ref)
    if directory is None:
        return None
    directory = model_folder(directory, store)
    if directory.startswith("s3://"):
        return download_model(directory, store, Path(settings.model_cache_dir).expanduser())
    path = Path(unquote(urlparse(directory).path))
    if not (path / MODEL_CONFIG_FILE).is_file():
        raise ModelLoadError(f"model directory {path} has no config.json: pass a save_pretrained directory")
    return path


def download_model(directory: str, store: ObjectStore, cache: Path) -> Path:
    """The s3:// model's files in a cache folder named by their content (keys, ETags, sizes).

    Workers sharing a cache volume download once (a file lock), never see a half-written
    model (downloaded into a temporary folder, renamed into place), and download again
    when the model at that URI is replaced (new ETags, new folder). Keys that would land
    outside the folder (absolute, `..`, empty segments) are refused.
    """
    files = [(model_key(directory, info.uri), info) for info in model_files(directory, store)]
    digest = hashlib.sha256(directory.encode() + b"\n")
    for key, info in sorted(files):
        digest.update(f"{key}\t{info.etag}\t{info.size}\n".encode())
    dest = cache / digest.hexdigest()[:32]
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per model per cache volume
        if dest.is_dir():
            return dest
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{dest.name}."))
        try:
            for key, info in files:
                target = staging / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(store.read(info.uri))
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def model_key(directory: str, uri: str) -> str:
    """A model file's path inside the model folder; ModelLoadError for one that would escape it."""
    key = relative_key(directory, uri)
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise ModelLoadError(f"model {directory} holds the key {key!r}, which would be written outside the model "
                             "cache folder: remove it from the model's prefix")
    return key


def check_model_dir(path: Path, allow_pickle: bool = False) -> dict:
    """config.json of a model directory, once it is known that loading it runs no code and no pickle.

    Every load goes through here (inference and fine-tuning's starting model): retrying cannot
    fix what this refuses, so the job fails once with the reason.
    """
    try:
        config = json.loads((path / MODEL_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model directory {path}: config.json cannot be read ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"model directory {path}: config.json is not a JSON object")
    if "auto_map" in config:
        raise ModelLoadError(
            f"model directory {path} names its own code (auto_map: {sorted(config['auto_map'])}): vitbatch never "
            "runs code shipped with a model; use an architecture that transformers or timm provide"
        )
    _check_weights(path, allow_pickle)
    return config


def read_local_config(path: Path) -> dict | None:
    """config.json of a local model directory (not orchestrator.jobspec.modelrefs.read_config, which takes a reference)."""
    try:
        return json.loads((path / MODEL_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None  # check_model_dir says why


def _check_weights(path: Path, allow_pickle: bool) -> None:
    """safetensors only. Next to pickle files, the safetensors must be the file loaders try first
    (model.safetensors, or a sharded index): timm would take pytorch_model.bin before a
    differently named safetensors file."""
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern))
    safetensors = any(path.glob("*.safetensors"))
    preferred = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if allow_pickle or (safetensors and (preferred or not pickles)):
        return
    if safetensors:
        raise UnsafeCheckpoint(
            f"{path} holds pickle weights ({', '.join(pickles)}) next to safetensors not named model.safetensors: "
            "rename the safetensors file to model.safetensors or remove the pickle files"
        )
    if pickles:
        raise UnsafeCheckpoint(
            f"{path} holds only pickle weights; convert them to safetensors or set allow_pickle "
            "(then loaded with weights_only=True)"
        )
    raise ModelLoadError(f"model directory {path} has no weights: expected model.safetensors (save_pretrained "
                         "or timm's save_for_hf with safe_serialization)")
