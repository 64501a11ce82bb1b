"""Where a model comes from: `--model` references, and the `--config` keys that would load files.

Both raise SpecError saying what to write instead; the spec validators hand the message
to pydantic, so `parse_spec` reports it on its field.
"""

from __future__ import annotations

import re

from orchestrator.errors import SpecError
from orchestrator.storage import normalize_uri

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
