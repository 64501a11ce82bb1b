"""Every Redis key, task name and output file name, in one place."""

TASK_RUN_SHARD = "vitbatch.run_shard"
TASK_FINETUNE = "vitbatch.finetune"
TASK_EVALUATE = "vitbatch.evaluate"
TASK_EXPORT = "vitbatch.export"
TASK_SCHEDULED_RUN = "vitbatch.scheduled_run"
TASK_VECTOR_SHARD = "vitbatch.vector_shard"  # dedup and neighbors: shards of an embed job's vectors

QUEUE_DEFAULT = "vitbatch"  # the bulk lane
QUEUE_INTERACTIVE = "vitbatch-interactive"  # small jobs: workers drain it before the bulk lane
QUEUE_TRAIN = "vitbatch-train"

JOB_SPEC_FILE = "_job.json"  # at the prefix: the job that last took it; in a job's folder: that job's record
SUCCESS_FILE = "_SUCCESS.json"  # the one object readers start from: the latest succeeded job and its parts
FAILURES_FILE = "_FAILURES.json"
JOBS_DIR = "_jobs"  # <output>/_jobs/<job id>/: everything one job writes
MANIFEST_DIR = "_manifests"
COMMIT_DIR = "_commits"
ERRORS_FILE_PREFIX = "errors"
CARRIED_MARKER = f"{COMMIT_DIR}/carried-00000.json"  # rows an incremental run carried over from the last job
CARRIED_PART = "carried-00000.parquet"  # those rows, copied from the previous run's committed parts
KEPT_COLUMNS_FILE = f"{MANIFEST_DIR}/kept-columns.arrow"  # the arrow schema of the parquet columns a job keeps
VECTORS_DIR = "vectors"  # embed --parquet-vectors: vectors/part-NNNNN.parquet in the job's folder
OVERLAYS_DIR = "overlays"  # attention: overlays/part-NNNNN-RRRRRR.png in the job's folder
MODEL_CONFIG_FILE = "config.json"  # a model directory's config (HF and timm save_pretrained, ONNX exports)
CHECKPOINTS_DIR = "checkpoints"  # a fine-tune's resumable checkpoints/step-NNNNNNNN/, beside its model
CHECKPOINT_COMMITTED = "_COMMITTED.json"  # a fine-tune checkpoint step is whole once this is written
ONNX_MODEL_FILE = "model.onnx"
EXPORT_REPORT_FILE = "export_report.json"
VECTOR_PLAN_FILE = "_vector_plan.json"  # in a dedup/neighbors job's folder: its source parts and phases
KEPT_MANIFEST = "kept.jsonl"  # in a dedup job's folder: the kept keys, in the embed job's input
REPORT_FILE = "_report.html"  # at the prefix: the latest succeeded job's page (orchestrator/published/report.py)


def job_key(job_id: str) -> str:
    """Hash: state, spec json, output, counts, timestamps."""
    return f"vitbatch:job:{job_id}"


def shard_state_key(job_id: str) -> str:
    """Hash: shard index -> state (pending, running, committed, failed)."""
    return f"vitbatch:job:{job_id}:shards"


def shard_done_key(job_id: str) -> str:
    """Hash: shard index -> items processed so far (set, not incremented: idempotent)."""
    return f"vitbatch:job:{job_id}:done"


def shard_errors_key(job_id: str) -> str:
    """Hash: shard index -> error rows in the committed shard."""
    return f"vitbatch:job:{job_id}:errors"


def shard_attempts_key(job_id: str) -> str:
    """Hash: shard index -> deliveries so far (for quarantine)."""
    return f"vitbatch:job:{job_id}:attempts"


def shard_reason_key(job_id: str) -> str:
    """Hash: shard index -> why the shard failed."""
    return f"vitbatch:job:{job_id}:reasons"


def shard_last_error_key(job_id: str) -> str:
    """Hash: shard index -> the last exception a delivery of the shard raised."""
    return f"vitbatch:job:{job_id}:last_error"


def shard_lease_key(job_id: str) -> str:
    """Hash: shard index -> the lease token of its latest delivery (only grows; see fencing.py)."""
    return f"vitbatch:job:{job_id}:lease"


def shard_advanced_key(job_id: str) -> str:
    """Hash: shard index -> unix time its done count last grew (or its delivery started)."""
    return f"vitbatch:job:{job_id}:advanced"


def shard_heartbeat_key(job_id: str) -> str:
    """Hash: shard index -> unix time a worker last said it was working on the shard."""
    return f"vitbatch:job:{job_id}:heartbeat"


def shard_items_key(job_id: str) -> str:
    """Hash: shard index -> images found in a .tar shard."""
    return f"vitbatch:job:{job_id}:tar_items"


def shard_enqueued_key(job_id: str) -> str:
    """Hash: shard index -> unix time its latest message was sent."""
    return f"vitbatch:job:{job_id}:enqueued"


def shard_stats_key(job_id: str) -> str:
    """Hash: shard index -> json stats of the committed shard (seconds per stage, images/s)."""
    return f"vitbatch:job:{job_id}:stats"


def schedule_runs_key(name: str) -> str:
    """List: json run records of a schedule, newest first."""
    return f"vitbatch:schedule:{name}:runs"


def output_lease_key(output: str) -> str:
    """String: "<job id> <unix time>" of the live job that holds an output prefix (SET NX)."""
    import hashlib

    return f"vitbatch:output:{hashlib.sha256(output.rstrip('/').encode()).hexdigest()[:40]}"


KOMBU_UNACKED_KEY = "unacked"
"""Hash kombu's Redis transport keeps delivered, unacknowledged messages in (its Channel.unacked_key):
delivery tag -> JSON [message, exchange, routing key]."""
KOMBU_UNACKED_INDEX_KEY = "unacked_index"
"""Sorted set beside it (Channel.unacked_index_key): delivery tag scored by the time it was delivered."""


def shard_task_id(job_id: str, shard: int) -> str:
    """The Celery task id of a shard's message: Flower and the logs name shards by it."""
    return f"{job_id}-{shard:05d}"


def job_state_channel(job_id: str) -> str:
    """Pub/sub channel (not a key): the job's new state, published as it is recorded."""
    return f"vitbatch:job:{job_id}:state-changes"


def job_keys(job_id: str) -> list[str]:
    """Every key one job owns: they expire together once the job ends."""
    return [job_key(job_id), shard_state_key(job_id), shard_done_key(job_id), shard_errors_key(job_id),
            shard_attempts_key(job_id), shard_reason_key(job_id), shard_last_error_key(job_id),
            shard_heartbeat_key(job_id), shard_items_key(job_id), shard_enqueued_key(job_id),
            shard_stats_key(job_id), shard_lease_key(job_id), shard_advanced_key(job_id)]


SCHEDULE_RUNS_KEPT = 1000  # run records per schedule; older ones are trimmed

RECONCILE_ERRORS_KEY = "vitbatch:reconcile:errors"
"""Counter: reconciler passes over one job that raised (the fleet exporter shows it)."""

REDIS_OOM_REFUSALS_KEY = "vitbatch:redis:oom-refusals"
"""Counter: writes Redis refused at maxmemory that a client or the reconciler rode out (the fleet exporter shows it)."""

JOBS_INDEX_KEY = "vitbatch:jobs"
"""Sorted set: job id scored by submit time."""

REDIS_PROBE_KEY = "vitbatch:probe"
"""String: what a worker holding a shard writes to learn whether Redis accepts writes again."""


def part_name(shard: int, ext: str) -> str:
    return f"part-{shard:05d}.{ext}"


def manifest_name(shard: int) -> str:
    return f"{MANIFEST_DIR}/shard-{shard:05d}.jsonl"


def commit_name(shard: int) -> str:
    return f"{COMMIT_DIR}/part-{shard:05d}.json"
