"""A job's publication: its record in its folder, then at the prefix, the commit point readers follow.

Every path that ends a job publishes through `publish` (finalize for a queued job, the in-process
runs), with the one typed record (commits.JobRecord), so `_SUCCESS.json`, the Delta table and the
job's page cannot drift between them.
"""

from __future__ import annotations

from typing import Any

from orchestrator.constants import FAILURES_FILE, SUCCESS_FILE
from orchestrator.lifecycle.commits import JobRecord
from orchestrator.published.delta import commit_job
from orchestrator.published.report import write_report_quietly
from orchestrator.store.storage import ObjectStore, join


def publish(store: ObjectStore, output: str, record: JobRecord, succeeded: bool, spec: dict[str, Any]) -> None:
    """Write the job's record in its folder, then at the prefix (the commit point readers follow).

    Only a success commits the job's rows to the Delta table at the prefix (once: delta.py),
    replaces `_SUCCESS.json` (and clears `_FAILURES.json`) and moves the spec's alias (if any) to
    this output; finalize then removes the folders of the jobs it replaced that the table's
    latest two commits no longer hold.
    """
    name = SUCCESS_FILE if succeeded else FAILURES_FILE
    data = record.to_bytes()
    store.write(join(output, record.job_dir, name), data)
    if succeeded:  # the Delta table holds the job before `_SUCCESS.json` says it is live (delta.py)
        commit_job(output, record, store)
    store.write(join(output, name), data)
    if succeeded:
        store.delete(join(output, FAILURES_FILE))  # a retry fixed what an earlier pass reported
        if spec.get("alias"):  # nightly jobs that name this alias pick the new model up by themselves
            store.write(spec["alias"], output.encode())
        write_report_quietly(output, store)  # the job's page (report.py); never fails the publication
