"""Labeled images inside parquet files and webdataset tars, for finetune and evaluate.

- parquet: one item per row, keyed `<file key>/<row index>` and read from `<file uri>#<row index>`;
  its label is the `--label-column` value, or the only `ClassLabel` column of the `huggingface`
  metadata, whose ids are given their names. The label column is read whole (a few bytes per
  row); the images are not read here.
- webdataset tars: one item per image member, keyed `<tar key>/<member>` and read from
  `<tar uri>#<member>`; its label is the text of the `.cls` member beside it (`<stem>.cls`,
  `--label-key cls`, the default), or a field of its `.json` member (`--label-key <field>`).
  A tar is streamed once here, keeping only the label members.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.errors import SpecError
from orchestrator.parquetinputs import class_names, hf_features, image_column, is_table_key
from orchestrator.planner import is_image_key
from orchestrator.storage import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class LabelOptions:
    """Where labels are when they are not folder names or a key,label manifest (from the spec)."""

    image_column: str | None = None
    label_column: str | None = None
    label_key: str = "cls"


def label_options(spec) -> LabelOptions:
    return LabelOptions(image_column=getattr(spec, "image_column", None),
                        label_column=getattr(spec, "label_column", None),
                        label_key=getattr(spec, "label_key", None) or "cls")


def is_container_key(key: str) -> bool:
    """Objects whose contents are the labeled images: parquet files, save_to_disk Arrow streams, (gzipped) tars."""
    return is_table_key(key) or key.lower().endswith((".tar", ".tar.gz", ".tgz"))


def label_column(schema: pa.Schema, uri: str, requested: str | None) -> str:
    """The label column: the one named, or the file's only ClassLabel column; SpecError saying what to pass."""
    if requested is not None:
        if requested not in schema.names:
            raise SpecError(f"--label-column {requested!r} is not a column of {uri} (it has {', '.join(schema.names)})")
        return requested
    typed = [name for name, f in hf_features(schema).items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"]
    if len(typed) == 1 and typed[0] in schema.names:
        return typed[0]
    raise SpecError(f"{uri}: name the label column with --label-column (the huggingface metadata types "
                    f"{len(typed)} columns as ClassLabel)")


def parquet_rows(key: str, info: ObjectInfo, store: ObjectStore, options: LabelOptions) -> list:
    """LabeledItems of one parquet file or save_to_disk Arrow stream (labels read; images not, for parquet)."""
    from orchestrator.labels import LabeledItem
    from orchestrator.tablefiles import read_table_footer

    try:
        footer = read_table_footer(store, info.uri, info.size)
        image_column(footer.schema, info.uri, options.image_column)
        column = label_column(footer.schema, info.uri, options.label_column)
        values = footer.read_column(store, column)
    except (ValueError, pa.ArrowException, OSError) as e:
        raise SpecError(f"{info.uri}: {e}; fix or remove the file") from e
    names = class_names(footer.schema, column)
    items = []
    for row, value in enumerate(values):
        if value is None or (names is not None and not 0 <= value < len(names)):
            raise SpecError(f"{info.uri} row {row}: no label in {column!r} ({value!r}); drop the row or label it")
        items.append(LabeledItem(key=f"{key}/{row}", uri=cell_address(info.uri, row, options.image_column),
                                 label=names[value] if names is not None else str(value).strip()))
    return items


def tar_members(key: str, info: ObjectInfo, store: ObjectStore, options: LabelOptions, max_tar_bytes: int) -> list:
    """LabeledItems of one webdataset tar: each image member with the label beside it."""
    from orchestrator.labels import LabeledItem

    images: list[str] = []
    labels: dict[str, str] = {}
    wanted = ".cls" if options.label_key == "cls" else ".json"
    try:
        data = store.read(info.uri, max_bytes=max_tar_bytes)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
            for member in archive:
                if not member.isfile() or member.name.startswith("/") or ".." in member.name.split("/"):
                    continue
                if is_image_key(member.name):
                    images.append(member.name)
                elif member.name.lower().endswith(wanted):
                    stream = archive.extractfile(member)
                    if stream is None:  # only a regular file has a stream, and only those reach here
                        raise SpecError(f"{info.uri}: the member {member.name} has no contents to read")
                    labels[_stem(member.name)] = _label(stream.read(), member.name, options)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SpecError(f"{info.uri} is not a readable tar ({type(e).__name__}: {e})") from e
    missing = [name for name in images if _stem(name) not in labels]
    if missing:
        raise SpecError(f"{info.uri}: {len(missing)} images have no {wanted} member beside them (e.g. {missing[0]}); "
                        f"pass --label-key cls for .cls members or --label-key <field> for a field of .json members")
    return [LabeledItem(key=f"{key}/{name}", uri=f"{info.uri}#{name}", label=labels[_stem(name)]) for name in images]


def cell_address(uri: str, row: int, column: str | None) -> str:
    """Where a labeled parquet row's image is: `<file uri>#<row>`, or `<file uri>#<row>:<column>` when the
    image column was named (the worker reads the address alone, without the spec)."""
    return f"{uri}#{row}" + (f":{column}" if column else "")


def split_address(uri: str) -> tuple[str, str] | None:
    """(container uri, address inside it) of an image inside a parquet file or tar, else None."""
    lowered = uri.lower()
    for suffix in (".parquet#", ".arrow#", ".tar.gz#", ".tgz#", ".tar#"):
        at = lowered.rfind(suffix)
        if at >= 0:
            return uri[:at + len(suffix) - 1], uri[at + len(suffix):]
    return None


def _stem(member: str) -> str:
    """webdataset's sample key: the member's path up to the first dot of its file name."""
    folder, name = posixpath.split(member)
    return posixpath.join(folder, name.split(".", 1)[0])


def _label(data: bytes, member: str, options: LabelOptions) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if options.label_key == "cls":
        return text
    try:
        value = json.loads(text)[options.label_key]
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{member}: no {options.label_key!r} field in this JSON member") from e
    return str(value).strip()
