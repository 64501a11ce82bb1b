"""Inputs -> manifest shards under the output prefix.

A shard's manifest is the whole truth about which items it owns, so a
redelivered shard reads the same items in the same order and writes the same
rows. Nothing here reads image bytes.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator.errors import ObjectNotFound, SpecError, UnsafeKey, VitbatchError
from orchestrator.inputs.manifest import Item, write_manifests
from orchestrator.inputs.parquetinputs import ParquetColumns, is_table_key, shard_runs
from orchestrator.inputs.tablefiles import plan_parquet
from orchestrator.inputs.tarsamples import TarFields, fields_of, kept_schema
from orchestrator.store.scope import INPUT_LIST_SUFFIXES, brace_range, input_root, outside_input
from orchestrator.store.storage import ObjectInfo, ObjectStore, join, relative_key

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # webdataset shards, gzip-compressed or not


@dataclass
class Plan:
    items: list[Item]
    shard_size: int
    ignored: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    tars: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "key: why": links out, loops, FIFOs, unlistable
    row_groups: list[Item] = field(default_factory=list)  # parquet row groups (parquetinputs.py)
    kept_columns: object | None = None  # pyarrow.Schema of --keep-columns, from the parquet footers
    not_kept: int = 0  # images --kept-by left out (a dedup job removed them)
    model_identity: str | None = None  # the model's files as planned (modelrefs.model_identity): carry-over's key

    @property
    def n_shards(self) -> int:
        return -(-len(self.items) // self.shard_size) + len(self.tars) + len(self._parquet_runs())

    def first(self) -> range:
        """The shards submit sends: all of them (an image job has one phase)."""
        return range(self.n_shards)

    def write(self, folder: str, store: ObjectStore) -> None:
        """The shards' manifests in the job's folder (what a worker reads of its shard)."""
        write_manifests(self, folder, store)

    def _parquet_runs(self) -> list[list[Item]]:
        return list(shard_runs(self.row_groups, self.shard_size))

    def shards(self) -> Iterator[tuple[int, list[Item]]]:
        """Image shards of shard_size, then one shard per .tar (one object read for all its images), then
        parquet shards of whole row groups (up to shard_size rows)."""
        n_image_shards = -(-len(self.items) // self.shard_size)
        for index in range(n_image_shards):
            yield index, self.items[index * self.shard_size:(index + 1) * self.shard_size]
        for offset, tar in enumerate(self.tars):
            yield n_image_shards + offset, [tar]
        for offset, run in enumerate(self._parquet_runs()):
            yield n_image_shards + len(self.tars) + offset, run

    def summary(self) -> dict:
        parquet_rows = sum(group.rows for group in self.row_groups)
        return {
            "items": len(self.items) + parquet_rows, "shards": self.n_shards, "tar_shards": len(self.tars),
            "parquet_files": len({group.uri for group in self.row_groups}), "parquet_rows": parquet_rows,
            "parquet_row_groups": len(self.row_groups),
            "ignored_non_images": len(self.ignored), "ignored_examples": self.ignored[:10],
            "duplicate_keys": len(self.duplicates), "duplicate_examples": self.duplicates[:10],
            "skipped": len(self.skipped), "skipped_examples": self.skipped[:10],
            **({"not_kept_by_dedup": self.not_kept} if self.not_kept else {}),
        }


def is_image_key(key: str) -> bool:
    return posixpath.splitext(key.lower())[1] in IMAGE_SUFFIXES


def plan(input_uri: str, shard_size: int, store: ObjectStore, columns: ParquetColumns | None = None,
         fields: TarFields | None = None) -> Plan:
    """List the inputs (prefix or manifest file), keep the images, cut them into shards.

    `columns`: what the job asks of parquet inputs (parquetinputs.columns_of(spec)); their
    footers are read here (ranged reads, never a data page) and checked against it. `fields`:
    what it asks of webdataset tars' samples (tarsamples.fields_of(spec)); no tar is read here.
    """
    suffix = posixpath.splitext(input_uri.rstrip("/").lower())[1]
    skipped: list[str] = []
    if brace_range(input_uri) is not None:
        candidates = tars_of_range(input_uri)
    elif suffix in INPUT_LIST_SUFFIXES and store.exists(input_uri):
        candidates = _from_input_list(input_uri, store)
    elif is_table_key(input_uri) and store.exists(input_uri):
        candidates = iter([_one_object(input_uri, store)])
    else:
        candidates = _from_prefix(input_uri, store, skipped)
    root = input_root(input_uri)
    items, ignored, duplicates, tars, parquet, seen = [], [], [], [], [], set()
    for item in candidates:
        if item.key in seen:
            duplicates.append(item.key)  # first occurrence wins: deterministic
        elif (why := outside_input(item.uri, root)) is not None:
            skipped.append(f"{item.key}: {why}")  # the worker would refuse it too: the same check
        elif item.key.lower().endswith(TAR_SUFFIXES):
            seen.add(item.key)
            tars.append(Item(item.key, item.uri, item.size, item.etag, tar=True))
        elif is_table_key(item.key):  # parquet, or a datasets save_to_disk .arrow stream
            seen.add(item.key)
            parquet.append(item)
        elif not is_image_key(item.key):
            ignored.append(item.key)
        else:
            seen.add(item.key)
            items.append(item)
    columns = columns or ParquetColumns()
    _check_options(columns, fields or TarFields(), input_uri, bool(parquet), bool(tars))
    parquet_plan = plan_parquet(parquet, store, columns, root)
    ignored += parquet_plan.ignored
    if not items and not tars and not parquet_plan.row_groups:
        raise SpecError(
            f"no image files under {input_uri} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, .tar, .parquet, .arrow;"
            f" {len(ignored)} other files ignored, {len(skipped)} entries skipped{': ' + skipped[0] if skipped else ''})"
        )
    return Plan(items=items, shard_size=shard_size, ignored=ignored, duplicates=duplicates, tars=tars,
                skipped=skipped, row_groups=parquet_plan.row_groups,
                kept_columns=_kept_columns(columns.keep, parquet_plan.kept_columns, bool(tars), input_uri))


def _check_options(columns: ParquetColumns, fields: TarFields, input_uri: str, parquet: bool, tars: bool) -> None:
    """SpecError for a column or field option the input has nothing to apply to."""
    shared = {"--id-column", "--keep-columns"}  # parquet columns, or fields of a tar's samples
    only_parquet = [flag for flag in columns.asked if flag not in shared]
    if only_parquet and not parquet:
        raise SpecError(f"{', '.join(only_parquet)} apply to parquet inputs, and {input_uri} has no .parquet files")
    if fields.image_key and not tars:
        raise SpecError(f"--image-key applies to webdataset tars, and {input_uri} has no .tar files "
                        "(parquet inputs: --image-column)")
    either = [flag for flag in columns.asked if flag in shared]
    if either and not parquet and not tars:
        raise SpecError(f"{', '.join(either)} apply to parquet inputs and webdataset tars, and {input_uri} has "
                        "neither .parquet nor .tar files")


def _kept_columns(keep: tuple[str, ...], from_parquet: pa.Schema | None, tars: bool, input_uri: str) -> pa.Schema | None:
    """The kept columns' types: the parquet footers', and for tars the fields' own (tarsamples.kept_type,
    from the names: no tar is read to plan). Every shard writes them, so a job that keeps columns has them."""
    if not keep:
        return None
    schemas = [s for s in (from_parquet, kept_schema(keep) if tars else None) if s is not None]
    if not schemas:
        raise SpecError(f"--keep-columns {', '.join(keep)}: {input_uri} has no .tar file and no parquet file with "
                        "an image column to take them from (a table without images, such as the .parquet file "
                        "img2dataset writes beside each .tar, is ignored)")
    try:
        return pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SpecError(f"--keep-columns: the parquet files and the tars give a column different types ({e}); "
                        "a tar's fields are text, or bytes for binary members") from e


MAX_BRACE_OBJECTS = 1_000_000


def tars_of_range(input_uri: str) -> Iterator[Item]:
    """`.../{00000..00099}.tar` (img2dataset's shard sets): one tar item per number, never listed.

    Numbers keep the width of the range's first bound; a tar the range names but the store lacks
    becomes an error row when its shard runs (tarshards: "tar not read")."""
    start, end, width, head, tail = brace_range(input_uri) or (0, -1, 0, "", "")
    if not tail.lower().endswith(TAR_SUFFIXES):
        raise SpecError(f"{input_uri}: a brace range names webdataset tar shards ({', '.join(TAR_SUFFIXES)}); "
                        "for other files pass the folder or a manifest")
    if end < start or end - start + 1 > MAX_BRACE_OBJECTS:
        raise SpecError(f"{input_uri}: the range must run upwards and name at most {MAX_BRACE_OBJECTS:,} objects")
    folder = head.rsplit("/", 1)[0]
    for number in range(start, end + 1):
        uri = f"{head}{number:0{width}d}{tail}"
        yield Item(key=relative_key(folder, uri), uri=uri)


def _from_prefix(prefix: str, store: ObjectStore, skipped: list[str]) -> Iterator[Item]:
    try:
        infos: Iterable[ObjectInfo] = store.list(prefix, skipped)
        for info in infos:
            key = relative_key(prefix, info.uri)
            if any(part.startswith(".") for part in key.split("/")):
                continue  # hidden files and folders (.ipynb_checkpoints), our atomic-write temporaries
            yield Item(key=key, uri=info.uri, size=info.size, etag=info.etag)
    except ObjectNotFound as e:
        raise SpecError(f"input {prefix} is unreadable: {e}") from e


def _one_object(uri: str, store: ObjectStore) -> Item:
    """A single object given as the input (a .parquet file): keyed by its name, as under its folder."""
    info = store.info(uri)
    return Item(key=relative_key(input_root(uri), uri), uri=uri, size=info.size, etag=info.etag)


def _from_input_list(manifest_uri: str, store: ObjectStore) -> Iterator[Item]:
    """One key per line, or JSON lines with a 'key' field; keys are relative to the manifest's folder.

    Keys are taken exactly as written (`#`, `?`, `%`, unicode), except that a plain line is
    stripped of surrounding spaces and one starting with '#' is a comment: a key that starts
    with '#' or has surrounding spaces goes in a JSON line, which is never altered.
    """
    base = manifest_uri.rsplit("/", 1)[0]
    text = store.read(manifest_uri).decode("utf-8-sig")
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = _manifest_key(line, manifest_uri, lineno)
        try:
            uri = join(base, key)
        except UnsafeKey as e:
            raise SpecError(f"{manifest_uri} line {lineno}: key {key!r} escapes the manifest's folder") from e
        yield Item(key=key, uri=uri)


def _manifest_key(line: str, manifest_uri: str, lineno: int) -> str:
    if not line.startswith("{"):
        return line
    try:
        key = json.loads(line)["key"]
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{manifest_uri} line {lineno}: expected a JSON object with a 'key' field") from e
    if not isinstance(key, str) or not key:
        raise SpecError(f"{manifest_uri} line {lineno}: 'key' must be a non-empty string")
    return key


def plan_job(spec, store: ObjectStore) -> Plan:
    """The plan of an inference job's spec: its input, its parquet columns, and, with `--kept-by`,
    only the keys a dedup job kept (embed, dedup, then classify the kept images)."""
    from orchestrator.inputs.parquetinputs import columns_of

    job_plan = plan(spec.input, spec.shard_size, store, columns_of(spec), fields_of(spec))
    if getattr(spec, "kept_by", None):
        keep_only(job_plan, spec.kept_by, store)
    return job_plan


def keep_only(job_plan: Plan, dedup_output: str, store: ObjectStore) -> None:
    """Drop every planned image the dedup job at `dedup_output` did not keep (SpecError when none is left)."""
    from orchestrator.published.results import read_kept_keys

    if job_plan.tars or job_plan.row_groups:
        raise SpecError("--kept-by selects image files; the input also holds tars or parquet rows: point --input "
                        "at the image files the embed job read")
    try:
        kept = set(read_kept_keys(dedup_output, store))
    except VitbatchError as e:
        raise SpecError(f"--kept-by {dedup_output}: no dedup result to read ({e}): run `vitbatch run dedup` first") from e
    before = len(job_plan.items)
    job_plan.items = [item for item in job_plan.items if item.key in kept]
    job_plan.not_kept = before - len(job_plan.items)
    if not job_plan.items:
        raise SpecError(f"--kept-by {dedup_output}: none of the {before} images of --input is among the "
                        f"{len(kept)} keys the dedup job kept: was its embed job run on this --input?")
