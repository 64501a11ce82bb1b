"""Labeled images inside parquet files and webdataset tars, for finetune and evaluate.

- parquet: one item per row, keyed `<file key>/<row index>` and read from `<file uri>#<row index>`;
  its label is the `--label-column` value, or the only `ClassLabel` column of the `huggingface`
  metadata, whose ids are given their names. The label column is read whole (a few bytes per
  row); the images are not read here.
- webdataset tars: one item per sample, as webdataset groups members (`x.jpg` + `x.cls`: sample `x`;
  orchestrator/inputs/tarsamples.py), keyed `<tar key>/<sample key>` and read from `<tar uri>#<image member>`;
  its image is the `--image-key` field (default: the first of jpg, jpeg, png, webp, ...), its label the
  text of its `.cls` member (`--label-key cls`, the default), or a field of its `.json` member
  (`--label-key <field>`, `json.<path>`). A tar is streamed once here, keeping only the label members.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.errors import ObjectTooLarge, SpecError
from orchestrator.inputs.parquetinputs import class_names, hf_features, image_column, is_table_key
from orchestrator.inputs.tarsamples import JSON_FIELDS, FieldError, Sample, as_text, lookup, read_samples
from orchestrator.store.storage import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class LabeledItem:
    """One labeled image: `key` is what reports show, `uri` where to read it."""

    key: str
    uri: str
    label: str


@dataclass(frozen=True)
class LabelOptions:
    """Where labels are when they are not folder names or a key,label manifest (from the spec)."""

    image_column: str | None = None
    label_column: str | None = None
    label_key: str = "cls"
    image_key: str | None = None  # webdataset tars: the image field; unset = the first of tarsamples.IMAGE_FIELDS


def label_options(spec) -> LabelOptions:
    return LabelOptions(image_column=getattr(spec, "image_column", None), image_key=getattr(spec, "image_key", None),
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


def parquet_rows(key: str, info: ObjectInfo, store: ObjectStore, options: LabelOptions) -> list[LabeledItem]:
    """LabeledItems of one parquet file or save_to_disk Arrow stream (labels read; images not, for parquet)."""
    from orchestrator.inputs.tablefiles import read_table_footer

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


def tar_members(key: str, info: ObjectInfo, store: ObjectStore, options: LabelOptions, max_tar_bytes: int) -> list[LabeledItem]:
    """LabeledItems of one webdataset tar: each sample (webdataset's grouping, tarsamples.py) with its image
    field and its label field; SpecError for a sample webdataset's `to_tuple(image, label)` would fail on."""
    label = options.label_key
    try:
        data = store.read(info.uri, max_bytes=max_tar_bytes)
        # only the label members are read here: the images are the worker's to read
        samples = read_samples(data, lambda name: name == label or name in JSON_FIELDS, max_tar_bytes, max_tar_bytes)
    except (tarfile.TarError, EOFError, OSError, zlib.error, ObjectTooLarge) as e:
        raise SpecError(f"{info.uri} is not a readable tar ({type(e).__name__}: {e})") from e
    items, missing = [], []
    for sample in samples:
        image = sample.image_field(options.image_key)
        if sample.problem or image is None:
            raise SpecError(f"{info.uri}: {sample.problem or sample.no_image(options.image_key)}; pass --image-key "
                            "or fix the tar")
        text = _label(sample, label, info.uri)
        if not text:
            missing.append(sample.key)
            continue
        items.append(LabeledItem(key=f"{key}/{sample.key}", uri=f"{info.uri}#{sample.fields[image].name}", label=text))
    if missing:
        raise SpecError(f"{info.uri}: {len(missing)} samples have no label {label!r} (e.g. {missing[0]}: no .{label} "
                        f"member, and no {label!r} field in a .json member); pass --label-key cls for .cls members "
                        "or --label-key <field> for a field of .json members")
    return items


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


def _label(sample: Sample, label_key: str, uri: str) -> str:
    """The sample's label as text ('' when it has none): a member's text, or a .json field's value."""
    try:
        return (as_text(lookup(sample, label_key)) or "").strip()
    except FieldError as e:
        raise SpecError(f"{uri}: sample {sample.key!r}: {e}") from e
