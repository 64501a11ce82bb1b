"""A published job's rows as a Delta Lake table at the output prefix, for every other reader.

vitbatch's own readers follow `_SUCCESS.json`; pandas, polars, DuckDB, Spark and `datasets`
read tables. So the publication that makes a job live also commits the same parquet parts
`read_table` reads (classify rows; the embed and attention index; evaluate's predictions; dedup
and neighbors rows) to a Delta table whose root is the output prefix (`<prefix>/_delta_log/`).
Nothing is copied: the log's add actions name the files in the job's folder, relative to the
prefix (`_jobs/<job id>/part-00000.parquet`).

- One job is one commit: the first creates the table (version 0); an `--overwrite` rerun is one
  overwrite commit that removes the previous job's files and adds its own. The version before
  it still reads the previous run: a success keeps the folders of the jobs the table's latest
  two commits hold (`retained_jobs`) and removes older replaced ones (finalize.py).
- Idempotent: each commit carries the Delta transaction `vitbatch:<job id>` (and the job id in
  commitInfo); a publisher that finds its job's transaction already in the log commits nothing,
  so a redelivered or taken-over finalize never commits twice.
- Only a publisher holding the job's publication claim calls this (finalize.py), so a stale
  worker never commits.

deltalake (delta-rs) is imported on first use: a worker that never publishes never loads it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from orchestrator.config import Settings
from orchestrator.errors import ObjectNotFound, StorageError
from orchestrator.inputs.parquetinputs import read_footer
from orchestrator.lifecycle.commits import JobRecord, RecordPart
from orchestrator.store.localfs import local_path
from orchestrator.store.storage import ObjectStore, join

log = logging.getLogger(__name__)

APP_PREFIX = "vitbatch:"  # a job's Delta transaction (txn) appId: vitbatch:<job id>
JOB_ID_KEY = "vitbatch.job_id"  # in each commit's commitInfo
LOG_DIR = "_delta_log"


@dataclass(frozen=True)
class DeltaCommit:
    """What committing a job to the table did: the table version that holds it, its files, and
    whether this call made the commit (False: the job's transaction was already in the log)."""

    version: int
    files: int
    committed: bool


def app_id(job_id: str) -> str:
    return APP_PREFIX + job_id


def table_uri(output: str) -> str:
    """What deltalake opens: a local folder as a plain path; an s3:// prefix percent-encoded, since
    deltalake parses it as a URL (an S3 key's `#`, `?` or space would end or bend the path)."""
    if output.startswith("file://"):
        return str(local_path(output))
    return quote(output.rstrip("/"), safe="/:")


def storage_options(settings: Settings, output: str) -> dict[str, str] | None:
    """delta-rs's S3 settings mapped from how s3.py configures boto3: the same endpoint, region and
    credentials (boto3's chain: environment, profile, instance role), so both reach the same bucket."""
    if not output.startswith("s3://"):
        return None
    import boto3

    session = boto3.session.Session()
    options = {"AWS_REGION": session.region_name or "us-east-1"}
    if settings.s3_endpoint_url:
        options["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
        options["AWS_ALLOW_HTTP"] = str(settings.s3_endpoint_url.startswith("http://")).lower()
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        options.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = frozen.token
    return options


FOOTER_READS = 16  # concurrent footer reads: a 10,000-shard job's publication waits on latency, not bandwidth


def parts_schema(output: str, parts: list[RecordPart], store: ObjectStore) -> pa.Schema:
    """The parts' common arrow schema, from their footers (one ranged read each, FOOTER_READS at a
    time): parts may differ where one shard's kept column held only nulls."""
    def schema(part: RecordPart) -> pa.Schema:
        return read_footer(store, join(output, part.name), part.bytes).schema.to_arrow_schema()

    with ThreadPoolExecutor(min(FOOTER_READS, len(parts)), thread_name_prefix="vitbatch-footers") as pool:
        schemas = list(pool.map(schema, parts))
    return pa.unify_schemas(schemas).remove_metadata()


def _add_action(part: RecordPart, finished_ms: int) -> Any:
    from deltalake.transaction import AddAction

    return AddAction(path=part.name, size=part.bytes, partition_values={}, modification_time=finished_ms,
                     data_change=True, stats=json.dumps({"numRecords": part.rows}))


def _commit_properties(record: JobRecord, finished_ms: int) -> Any:
    from deltalake import CommitProperties, Transaction

    metadata = {JOB_ID_KEY: record.job_id, "vitbatch.kind": record.kind, "vitbatch.job_dir": record.job_dir}
    return CommitProperties(custom_metadata=metadata,
                            app_transactions=[Transaction(app_id(record.job_id), 1, finished_ms)])


def open_table(output: str, settings: Settings, version: int | None = None) -> Any:
    """The Delta table at an output prefix (deltalake.DeltaTable), at `version` or the latest."""
    from deltalake import DeltaTable

    return DeltaTable(table_uri(output), version=version, storage_options=storage_options(settings, output))


def commit_job(output: str, record: JobRecord, store: ObjectStore) -> DeltaCommit | None:
    """Commit a succeeded job's row parts to the table at `output` once; None when the job has no
    row parts (finetune, export) or their types have no Delta form (a float16 kept column)."""
    from deltalake.exceptions import CommitFailedError, TableNotFoundError
    from deltalake.schema import Schema

    parts = record.row_parts()  # what `read_table` reads, and so what the table holds
    if not parts:
        return None
    if output.startswith("file://") and "%" in str(local_path(output)):
        log.warning("job %s: no Delta table at %s: deltalake decodes a '%%' in a local path (a folder named "
                    "without one gets its table)", record.job_id, output)
        return None
    try:
        schema = Schema.from_arrow(parts_schema(output, parts, store))
    except Exception as e:  # deltalake raises a bare Exception for a type Delta cannot hold
        log.warning("job %s at %s: no Delta table commit, its rows have a type Delta cannot hold: %s",
                    record.job_id, output, str(e).splitlines()[0])
        return None
    finished_ms = int(record.finished_at * 1000)
    adds = [_add_action(part, finished_ms) for part in parts]
    props = _commit_properties(record, finished_ms)
    try:
        table = open_table(output, store.settings)
    except TableNotFoundError:
        return _create(output, record, schema, adds, props, store.settings)
    already = _committed(table, record.job_id)
    if already is not None:
        return already
    try:
        table.create_write_transaction(adds, mode="overwrite", schema=schema, commit_properties=props)
    except CommitFailedError:  # another publisher of this job won the race: its commit is this one
        return _require_committed(output, record.job_id, store.settings)
    return DeltaCommit(open_table(output, store.settings).version(), len(adds), True)


def _create(output: str, record: JobRecord, schema: Any, adds: list, props: Any, settings: Settings) -> DeltaCommit:
    """Version 0 holding the job's files; a publisher that loses the creation race reads the winner's."""
    from deltalake.transaction import create_table_with_add_actions

    try:
        create_table_with_add_actions(table_uri(output), schema, adds, mode="error",
                                      storage_options=storage_options(settings, output), commit_properties=props)
    except Exception:  # the table appeared meanwhile (deltalake says so only in its message)
        return _require_committed(output, record.job_id, settings)
    return DeltaCommit(0, len(adds), True)


def _committed(table: Any, job_id: str) -> DeltaCommit | None:
    if table.transaction_version(app_id(job_id)) is None:
        return None
    return DeltaCommit(table.version(), len(table.file_uris()), False)


def _require_committed(output: str, job_id: str, settings: Settings) -> DeltaCommit:
    """After a lost race the log must hold this job; otherwise the race was with someone else: raise,
    so the publication is released and the next finalize commits again."""
    already = _committed(open_table(output, settings), job_id)
    if already is None:
        raise StorageError(f"the Delta table at {output} changed while job {job_id} was committing; "
                           "the next finalize commits it")
    return already


def job_versions(output: str, store: ObjectStore) -> list[tuple[int, str]]:
    """(table version, job id) of every vitbatch commit whose log file is kept, newest first: which
    version to open for a previous run (time travel). Read from the log's JSON files themselves
    (deltalake's history() never returned against the S3 test server)."""
    try:
        infos = [info for info in store.list(join(output, LOG_DIR)) if info.uri.endswith(".json")]
    except ObjectNotFound:
        return []
    versions = []
    for info in infos:
        name = info.uri.rsplit("/", 1)[1]
        if not name[:-len(".json")].isdigit():
            continue
        for line in store.read(info.uri).decode().splitlines():
            commit = json.loads(line).get("commitInfo") if line.strip() else None
            if commit and JOB_ID_KEY in commit:
                versions.append((int(name[:-len(".json")]), str(commit[JOB_ID_KEY])))
    return sorted(versions, reverse=True)


RETAINED_COMMITS = 2  # the current run and the one before it stay readable (time travel one run back)


def retained_jobs(output: str, store: ObjectStore) -> set[str]:
    """The jobs whose files the table's latest RETAINED_COMMITS commits hold; {} without a table."""
    return {job for _, job in job_versions(output, store)[:RETAINED_COMMITS]}
