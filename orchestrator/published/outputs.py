"""A job's output belongs to that job: its own folder, one record that publishes it.

Layout under an output prefix:

    _job.json        the job that last took the prefix (created with a conditional write)
    _SUCCESS.json    the latest *succeeded* job: id, spec hash, and every part (name, sha256, rows)
    _FAILURES.json   the latest job that finished with failures (removed by the next success)
    _jobs/<job id>/  everything that job wrote: _job.json, _manifests/, _commits/, parts, arrays, model

As in Delta's transaction log or Hadoop's job committer, a job writes only inside its own
folder and becomes visible in one atomic object write (its `_SUCCESS.json`). Readers read
exactly the parts that record lists, never a listing, so a rerun, a half-finished rerun or
a concurrent writer never changes what they see of the previous succeeded job.

This module is where outputs go (a job's id and folder, the spec digest its records carry,
removing the folders a success replaced); reading them back is results.py's.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable

from orchestrator.constants import JOBS_DIR
from orchestrator.errors import ObjectNotFound, StorageError
from orchestrator.store.storage import ObjectStore, join, relative_key

log = logging.getLogger(__name__)


def new_job_id() -> str:
    """Sortable and unique: the submit time (UTC) and 24 random bits."""
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def job_dir(output: str, job_id: str) -> str:
    """Where one job writes everything it writes."""
    return join(output, JOBS_DIR, job_id)


def spec_digest(spec_json: str) -> str:
    """Names the spec a job ran with, in its markers and records."""
    return "sha256:" + hashlib.sha256(spec_json.encode()).hexdigest()


def remove_superseded(output: str, job_id: str, store: ObjectStore, removable: Callable[[str], bool]) -> list[str]:
    """Delete the folders of other jobs that `removable` allows (finalize.replaced_by: ended and
    older) once `job_id` is published; returns the job ids removed."""
    try:
        infos = list(store.list(join(output, JOBS_DIR)))
    except ObjectNotFound:
        return []
    others = sorted({relative_key(join(output, JOBS_DIR), info.uri).split("/", 1)[0] for info in infos} - {job_id})
    removed = []
    for other in filter(removable, others):
        try:
            store.delete_prefix(job_dir(output, other))
            removed.append(other)
        except StorageError as e:  # e.g. no s3:DeleteObject: the leftovers are invisible to readers anyway
            log.warning("could not remove replaced job %s at %s: %s", other, output, e)
    return removed
