"""Webdataset tars as webdataset reads them: members grouped into samples, a sample's members its fields.

The rule is webdataset's own (0.2.x `tariterators.base_plus_ext` and `group_by_keys`): a member's
sample key is its path up to the first dot of its file name, the rest (lowercased) is the field,
and consecutive members of one key are one sample: `x.jpg`, `x.seg.png`, `x.cls` are the sample
`x` with fields `jpg`, `seg.png` and `cls`; `b.000.jpg` is sample `b`, field `000.jpg`. Members
without a dot in their file name, webdataset's `__...__` metadata and non-regular members belong
to no sample. Where webdataset raises (one field twice in a sample), or yields a key a second time
(members of one key that are not consecutive), the sample here carries a `problem` instead, so it
becomes an error row with the reason rather than a failed job.

A sample's image is the field `--image-key` names, or the first of `IMAGE_FIELDS` it has; its
other fields are what labels (`--label-key`), keys (`--id-column`) and pass-through columns
(`--keep-columns`) are read from (`lookup`). Nothing here imports torch: the planner types the
kept columns and the submit checks read labels with it, and the worker expands tar shards with it.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator.errors import ObjectTooLarge

# Webdataset's usual priority (`to_tuple("jpg;jpeg;png;webp")`), then the other formats vitbatch decodes.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
JSON_FIELDS = ("json", "jsn")
# Fields whose bytes are text, as webdataset's autodecode reads them (cls and friends: integers as text).
TEXT_FIELDS = frozenset({"txt", "text", "transcript", "cls", "cls2", "class", "count", "index", "inx", "id",
                         *JSON_FIELDS})
BINARY_EXTENSIONS = frozenset({*IMAGE_FIELDS, "jfif", "npy", "npz", "pyd", "pickle", "ten", "tb", "mp",
                               "msgpack", "cbor", "bin", "mat", "flac", "mp3", "wav"})
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def base_plus_ext(name: str) -> tuple[str, str] | None:
    """(sample key, field) of a member name, as webdataset splits it; None for a name with no field."""
    match = _BASE_PLUS_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


@dataclass
class Member:
    """One member of a sample: its name, where its data starts in the tar, and its bytes when read
    (None: not asked for; a str: why it was not read)."""

    name: str
    offset: int
    size: int
    data: bytes | str | None = None


@dataclass
class Sample:
    """Consecutive members of one key: field -> member, in member order."""

    key: str
    fields: dict[str, Member] = field(default_factory=dict)
    problem: str | None = None  # why the whole sample is an error row (webdataset would raise here)

    def image_field(self, image_key: str | None) -> str | None:
        """The field that holds the sample's image: `image_key`, else the first of IMAGE_FIELDS present."""
        if image_key is not None:  # fields are lowercased, as webdataset lowercases them
            return image_key.lower() if image_key.lower() in self.fields else None
        return next((name for name in IMAGE_FIELDS if name in self.fields), None)

    def no_image(self, image_key: str | None) -> str:
        wanted = f"a {image_key!r} member" if image_key else f"an image member ({', '.join(IMAGE_FIELDS)})"
        has = ", ".join(self.fields) or "no members"
        return f"sample {self.key!r} has no image: it needs {wanted} and has {has}"


@dataclass(frozen=True)
class TarFields:
    """What a job reads from each sample besides its image (from its spec)."""

    image_key: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()
    label: str | None = None

    def names(self) -> list[str]:
        return [name for name in (self.id, *self.keep, self.label) if name]

    def wants(self, name: str) -> bool:
        """Whether a member with this field must be read (the rest are only counted into their sample)."""
        if name == (self.image_key or "").lower() or (self.image_key is None and name in IMAGE_FIELDS):
            return True
        asked = self.names()
        return name in asked or (bool(asked) and name in JSON_FIELDS)


NO_FIELDS = TarFields()  # a job that asks nothing of a sample but its image


def fields_of(spec) -> TarFields:
    """The tar options of any job spec (those without them ask for nothing)."""
    label = getattr(spec, "label_key", None)
    return TarFields(image_key=getattr(spec, "image_key", None), id=getattr(spec, "id_column", None),
                     keep=tuple(getattr(spec, "keep_columns", None) or ()), label=label)


def read_samples(data: bytes, wants: Callable[[str], bool], max_tar_bytes: int, max_member_bytes: int) -> list[Sample]:
    """The tar's samples in member order, streamed (`r|*`, gzip too) and never extracted to disk.

    ObjectTooLarge when the uncompressed content passes `max_tar_bytes` (a gzip bomb stops there);
    tarfile, zlib and EOF errors of a corrupt archive reach the caller."""
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        for member, key, name in _members(archive, max_tar_bytes):
            if not samples or samples[-1].key != key:
                seen[key] = seen.get(key, 0) + 1
                samples.append(Sample(key, problem=_repeated(key) if seen[key] > 1 else None))
            sample = samples[-1]
            if name in sample.fields:
                sample.problem = sample.problem or (f"duplicate member {member.name!r}: sample {key!r} already has a "
                                                    f"{name!r} field (webdataset refuses such a tar); not read")
                continue
            entry = Member(member.name, member.offset_data, member.size)
            if unsafe_name(member.name):
                sample.problem = sample.problem or f"unsafe member name {member.name!r} (absolute or '..'): not read"
            elif wants(name):
                entry.data = _member_bytes(archive, member, max_member_bytes)
            sample.fields[name] = entry
    return samples


def _members(archive: tarfile.TarFile, max_tar_bytes: int) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, sample key, lowercased field) of every member that belongs to a sample."""
    for member in archive:
        if member.offset_data + member.size > max_tar_bytes:
            raise ObjectTooLarge(f"its uncompressed content passes the cap of {max_tar_bytes} bytes")
        if not member.isreg() or _META.match(member.name) or (
                "/" not in member.name and member.name.startswith("__") and member.name.endswith("__")):
            continue
        split = base_plus_ext(member.name)
        if split is not None:
            yield member, split[0], split[1].lower()


def _repeated(key: str) -> str:
    return (f"duplicate sample key {key!r}: an earlier sample of this tar has it (webdataset groups consecutive "
            "members only: write each sample's members together, e.g. tar --sort=name); not read")


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo, max_member_bytes: int) -> bytes | str:
    if member.size > max_member_bytes:
        return str(ObjectTooLarge(f"member {member.name} is {member.size} bytes, over the cap of {max_member_bytes}"))
    stream = archive.extractfile(member)
    assert stream is not None  # a regular file: _members yields no other kind
    return stream.read()


class FieldError(ValueError):
    """A field's member cannot be read as asked (a .json member that is not JSON)."""


def lookup(sample: Sample, name: str) -> object | None:
    """A sample's field by name: a member (`cls`, `txt`, `seg.png`: its bytes), else a path into its .json
    member (`json.caption`, `json.a.b`, or a bare `caption`); None when the sample has neither."""
    if name in sample.fields:
        data = sample.fields[name].data
        return data if isinstance(data, bytes) else None  # not read: over the cap
    head, _, rest = name.partition(".")
    source, path = (head, rest) if head in JSON_FIELDS and rest else (None, name)
    for json_field in ([source] if source else JSON_FIELDS):
        member = sample.fields.get(json_field)
        if member is not None and isinstance(member.data, bytes):
            return _walk(_parsed(member), path.split("."))
    return None


def _parsed(member: Member) -> object:
    assert isinstance(member.data, bytes)
    try:
        return json.loads(member.data)
    except ValueError as e:
        raise FieldError(f"member {member.name} is not JSON ({e})") from e


def _walk(value: object, path: list[str]) -> object | None:
    for step in path:
        if not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def as_text(value: object) -> str | None:
    """A field's value as text: a member's UTF-8 text, a JSON string as it is, other JSON values as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(value, ensure_ascii=False)


def kept_type(name: str) -> pa.DataType:
    """The output type of a kept field, known from its name alone (planning reads no tar): binary for a
    member whose last extension is binary (`seg.png`, `npy`), text for everything else."""
    return pa.binary() if name.rsplit(".", 1)[-1].lower() in BINARY_EXTENSIONS else pa.string()


def kept_schema(names: tuple[str, ...]) -> pa.Schema:
    return pa.schema([pa.field(name, kept_type(name)) for name in names])


def kept_value(value: object, kind: pa.DataType) -> object | None:
    """A field's value in its column's type (text as text, bytes as bytes)."""
    if value is None:
        return None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return value if isinstance(value, bytes) else (as_text(value) or "").encode()
    return as_text(value)
