"""Webdataset tar shards (also gzip-compressed: .tar.gz, .tgz) -> rows: one per sample, as webdataset groups them.

A sample is the tar's consecutive members of one key (`x.jpg`, `x.seg.png`, `x.cls`: sample `x`;
orchestrator/inputs/tarsamples.py holds webdataset's rule). Its row is keyed `<tar key>/<sample key>`, or by
its `--id-column` field, in member order, so a redelivered shard yields the same rows. Its image is
the `--image-key` field (default: the first of jpg, jpeg, png, webp, ... it has); its other fields
give the `--id-column` key and the `--keep-columns` values. A sample without an image, with an unsafe
member name (absolute, `..`), with one field twice or a key seen earlier in the tar is an error row
with the reason; a second row of one key is keyed `<key>#2` (#3, ...), so no two rows share a key.
Nothing is extracted anywhere: bytes stay in memory.

The archive is read as a stream (`r|*`), member after member, never decompressed whole,
and its uncompressed size is capped as its raw size is: a gzip bomb stops at the cap. A tar
that cannot be read at all (over a cap, corrupt, denied, outside the input) is one error row
under the tar's own key.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.tarsamples import (
    NO_FIELDS,
    FieldError,
    Sample,
    TarFields,
    as_text,
    kept_value,
    lookup,
    read_samples,
)
from orchestrator.store.storage import ObjectStore

Blobs = dict[str, bytes | str]


@dataclass
class TarRows:
    """A tar shard on the worker: its rows' items, uri -> image bytes or why not, and each row's kept fields."""

    items: list[Item] = field(default_factory=list)
    blobs: Blobs = field(default_factory=dict)
    kept: list[dict] = field(default_factory=list)  # one per item, in the kept columns' planned types


def expand(tar_item: Item, store: ObjectStore, max_tar_bytes: int, max_member_bytes: int,
           within: str | None = None) -> tuple[list[Item], Blobs]:
    """(sample items, uri -> image bytes, or an error reason for samples that are not read)."""
    rows = expand_rows(tar_item, store, max_tar_bytes, max_member_bytes, within)
    return rows.items, rows.blobs


def expand_rows(tar_item: Item, store: ObjectStore, max_tar_bytes: int, max_member_bytes: int,
                within: str | None = None, fields: TarFields = NO_FIELDS, kept: pa.Schema | None = None) -> TarRows:
    """The tar's rows with what `fields` asks of each sample; `kept`: the kept columns' planned types."""
    try:
        data = store.read(tar_item.uri, max_bytes=max_tar_bytes, within=within)
        samples = read_samples(data, fields.wants, max_tar_bytes, max_member_bytes)
    except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable) as e:
        return _whole_tar_error(tar_item, f"tar not read: {e}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # corrupt, truncated, bad gzip
        return _whole_tar_error(tar_item, f"not a readable tar archive ({type(e).__name__}: {e})")
    rows = TarRows()
    seen: dict[str, int] = {}
    for sample in samples:
        item, blob = _row(tar_item, sample, fields, seen)
        rows.items.append(item)
        rows.blobs[item.uri] = blob
        rows.kept.append(_kept(sample, kept))
    return rows


def _whole_tar_error(tar_item: Item, reason: str) -> TarRows:
    item = Item(key=tar_item.key, uri=tar_item.uri, size=tar_item.size, etag=tar_item.etag)
    return TarRows([item], {item.uri: reason}, [{}])


def _row(tar_item: Item, sample: Sample, fields: TarFields, seen: dict[str, int]) -> tuple[Item, bytes | str]:
    """The sample's item (keyed, unique within the tar) and its image bytes, or why it has none."""
    image = sample.image_field(fields.image_key)
    member = sample.fields[image] if image else next(iter(sample.fields.values()))
    key, why = _key(tar_item, sample, fields.id)
    seen[key] = seen.get(key, 0) + 1
    suffix = f"#{seen[key]}" if seen[key] > 1 else ""
    item = Item(key=f"{key}{suffix}", uri=f"{tar_item.uri}#{member.name if image else sample.key}{suffix}",
                size=member.size, etag=f"{tar_item.etag}:{member.offset}")
    if sample.problem or why:
        return item, sample.problem or why or ""
    if suffix:
        return item, f"duplicate --id-column value {key!r}: an earlier sample of this tar has it; not read"
    if image is None:
        return item, sample.no_image(fields.image_key)
    return item, member.data if member.data is not None else f"member {member.name} was not read"


def _key(tar_item: Item, sample: Sample, id_field: str | None) -> tuple[str, str | None]:
    """The row's key (`<tar key>/<sample key>`, or the sample's --id-column value), and why the sample
    cannot be keyed by its id when it cannot."""
    default = f"{tar_item.key}/{sample.key}"
    if id_field is None:
        return default, None
    try:
        value = as_text(lookup(sample, id_field))
    except FieldError as e:
        return default, f"--id-column {id_field!r}: {e}"
    if not value:
        return default, f"--id-column {id_field!r} is empty in this sample (no such member or .json field): no key"
    return value, None


def _kept(sample: Sample, kept: pa.Schema | None) -> dict:
    if kept is None:
        return {}
    out = {}
    for column in kept:
        try:
            out[column.name] = kept_value(lookup(sample, column.name), column.type)
        except FieldError:
            out[column.name] = None  # a .json member that is not JSON: the row's other columns still stand
    return out


def members(tar_item: Item, store: ObjectStore, max_tar_bytes: int, max_member_bytes: int) -> Blobs:
    """`<tar uri>#<member name>` -> bytes (or why not) of every member of the tar's samples, for readers that
    address members by name (finetune, evaluate); a tar that cannot be read: its own uri -> why."""
    try:
        data = store.read(tar_item.uri, max_bytes=max_tar_bytes)
        samples = read_samples(data, lambda _: True, max_tar_bytes, max_member_bytes)
    except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable) as e:
        return {tar_item.uri: f"tar not read: {e}"}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        return {tar_item.uri: f"not a readable tar archive ({type(e).__name__}: {e})"}
    return {f"{tar_item.uri}#{m.name}": m.data for s in samples for m in s.fields.values() if m.data is not None}
