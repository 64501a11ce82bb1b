"""Labeled images for finetune and evaluate: ImageFolder prefixes and key,label manifests.

Nothing here reads image bytes (the control plane never imports torch); bad images
are found by the worker that decodes them.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator

from orchestrator.errors import ObjectNotFound, SpecError, UnsafeKey
from orchestrator.inputs.labeledsources import LabeledItem, LabelOptions, is_container_key, parquet_rows, tar_members
from orchestrator.inputs.parquetinputs import is_table_key
from orchestrator.inputs.planner import is_image_key, tars_of_range
from orchestrator.store.scope import brace_range
from orchestrator.store.storage import ObjectInfo, ObjectStore, join, relative_key

LABEL_LIST_SUFFIXES = (".csv", ".jsonl")


def load_labeled(uri: str, store: ObjectStore, options: LabelOptions | None = None) -> list[LabeledItem]:
    """Items of an ImageFolder prefix or a .csv/.jsonl manifest, sorted by key, then the rows of the parquet
    files and tars there (or of the one given), in file and row order; SpecError when unusable."""
    suffix = posixpath.splitext(uri.rstrip("/").lower())[1]
    options = options or LabelOptions()
    if suffix in LABEL_LIST_SUFFIXES:
        items = sorted(_from_label_list(uri, store, suffix), key=lambda item: item.key)
    elif brace_range(uri) is not None:  # `.../{00000..00099}.tar`: webdataset shards named without listing
        items = _from_containers(_ranged_tars(uri, store), store, options)
    elif is_container_key(uri.rstrip("/")) and store.exists(uri):
        info = store.info(uri)
        items = _from_containers([(posixpath.basename(uri), info)], store, options)
    else:
        containers: list[tuple[str, ObjectInfo]] = []
        items = sorted(_from_folders(uri, store, containers), key=lambda item: item.key)
        items += _from_containers(containers, store, options)
    if not items:
        raise SpecError(f"no labeled images in {uri}")
    labels = class_names(items)
    if len(labels) < 2:
        raise SpecError(f"{uri} has {len(labels)} class ({', '.join(labels)}): a classifier needs at least 2")
    return items


def _from_containers(containers: list[tuple[str, ObjectInfo]], store: ObjectStore,
                     options: LabelOptions) -> list[LabeledItem]:
    """The labeled rows of parquet files and members of tars (orchestrator/inputs/labeledsources.py)."""
    items: list[LabeledItem] = []
    for key, info in containers:
        if is_table_key(key):  # parquet, or a datasets save_to_disk .arrow stream
            items += parquet_rows(key, info, store, options)
        else:
            items += tar_members(key, info, store, options, store.settings.max_tar_bytes)
    return items


def _ranged_tars(uri: str, store: ObjectStore) -> list[tuple[str, ObjectInfo]]:
    """(key, info) of each tar a brace range names; SpecError naming those missing, since their labels
    are read now (classify and embed, which need none, make a missing tar an error row instead)."""
    found, missing = [], []
    for item in tars_of_range(uri):
        try:
            found.append((item.key, store.info(item.uri)))
        except ObjectNotFound:
            missing.append(item.key)
    if missing:
        raise SpecError(f"{uri}: {len(missing)} of the {len(found) + len(missing)} tars the range names do not exist "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): their labels cannot be "
                        "read; narrow the range or list the tars in a folder")
    return found


def class_names(items: list[LabeledItem]) -> list[str]:
    """Sorted label names; a label's position is its id (as torchvision's ImageFolder numbers them)."""
    return sorted({item.label for item in items})


def _from_folders(prefix: str, store: ObjectStore, containers: list[tuple[str, ObjectInfo]]) -> list[LabeledItem]:
    """One folder per class directly under the prefix; images nested deeper keep their class. Parquet
    files and tars anywhere under it are appended to `containers` (their rows carry their own labels)."""
    items, folders = [], set()
    try:
        for info in store.list(prefix):
            key = relative_key(prefix, info.uri)
            if is_container_key(key) and not posixpath.basename(key).startswith("."):
                containers.append((key, info))
                continue
            if "/" not in key or posixpath.basename(key).startswith("."):
                continue  # files at the root are not in a class; dot files are temporaries
            label = key.split("/", 1)[0]
            folders.add(label)
            if is_image_key(key):
                items.append(LabeledItem(key=key, uri=info.uri, label=label))
    except ObjectNotFound as e:
        raise SpecError(f"input {prefix} does not exist ({e})") from e
    empty = sorted(folders - {item.label for item in items})
    if items and empty:
        raise SpecError(f"class {empty[0]!r} has no images under {join(prefix, empty[0])}"
                        + (f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else ""))
    return items


def _from_label_list(uri: str, store: ObjectStore, suffix: str) -> list[LabeledItem]:
    if not store.exists(uri):
        raise SpecError(f"labels file {uri} does not exist")
    text = store.read(uri).decode("utf-8-sig")
    base = uri.rsplit("/", 1)[0]
    rows = _csv_rows(text, uri) if suffix == ".csv" else _jsonl_rows(text, uri)
    items: list[LabeledItem] = []
    seen: dict[str, int] = {}  # key -> the line it first appeared on
    for line, key, label in rows:
        if not key:
            raise SpecError(f"{uri} line {line}: the row has no key")
        if not label:
            raise SpecError(f"{uri} line {line}: key {key!r} has no label")
        if key in seen:
            raise SpecError(f"{uri} line {line}: key {key!r} already appeared on line {seen[key]}")
        seen[key] = line
        try:
            items.append(LabeledItem(key=key, uri=join(base, key), label=label))
        except UnsafeKey as e:
            raise SpecError(f"{uri} line {line}: key {key!r} escapes the manifest's folder") from e
    return items


def _csv_rows(text: str, uri: str) -> Iterator[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"key", "label"} <= {name.strip() for name in reader.fieldnames}:
        raise SpecError(f"{uri}: the first line must be the header key,label (found {reader.fieldnames})")
    for row in reader:
        row = {(name or "").strip(): value for name, value in row.items()}
        if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
            continue  # blank line
        yield reader.line_num, (row.get("key") or "").strip(), (row.get("label") or "").strip()


def _jsonl_rows(text: str, uri: str) -> Iterator[tuple[int, str, str]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise SpecError(f"{uri} line {line}: not a JSON object ({e})") from e
        if not isinstance(obj, dict):
            raise SpecError(f"{uri} line {line}: expected an object with 'key' and 'label'")
        label = obj.get("label")
        # Integer class ids are common in manifests; they name classes like folder names do.
        yield line, str(obj.get("key") or "").strip(), "" if label is None else str(label).strip()


def check_val_labels(train_labels: set[str], val: list[LabeledItem]) -> None:
    """SpecError when validation has classes the model will not be trained on."""
    unknown = sorted({item.label for item in val} - set(train_labels))
    if unknown:
        raise SpecError(
            f"validation labels not in the training data: {', '.join(unknown)} "
            f"(training has {', '.join(sorted(train_labels))})"
        )
