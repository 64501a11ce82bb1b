"""Whether an output location can hold a job's files, and whether it is free to take.

`storable_output` is the spec's (specbase.py validates `output` with it, so `parse_spec` reports it
on its field); `check_prefix_free` is submit's, run before the prefix is taken.
"""

from __future__ import annotations

import re
from typing import Protocol
from urllib.parse import unquote

from orchestrator.constants import MODEL_CONFIG_FILE, SUCCESS_FILE
from orchestrator.errors import SpecError
from orchestrator.jobspec.submitted import prefix_holder
from orchestrator.store.storage import ObjectStore, join

_S3_BUCKET = re.compile(r"^[A-Za-z0-9._-]{1,255}$")  # what any S3 store takes (AWS today: stricter)
_S3_KEY_BYTES = 1024  # S3's limit on a whole key
_OUTPUT_ROOM = 200  # what vitbatch appends under an output prefix (_jobs/<id>/_manifests/shard-NNNNN.jsonl, ...)
_NAME_BYTES = 255  # one file name on Linux file systems
_LOCAL_PATH_BYTES = 4096


class OutputSpec(Protocol):
    """What the prefix check reads of a job spec (every kind's has it; its inputs, where it has
    them, are read by name), so this module needs nothing of the specs, which use it."""

    @property
    def output(self) -> str: ...


def storable_output(uri: str) -> str:
    """A canonical output URI, or SpecError saying which character or length its store cannot hold.

    `#`, `?`, `%`, spaces and unicode are fine (keys are kept as written); control characters
    are not (S3 listings are XML, and a terminal would hide them), nor a key or file name
    longer than the store allows once vitbatch's own names are appended.
    """
    text = unquote(uri[len("file://"):]) if uri.startswith("file://") else uri
    bad = sorted({f"U+{ord(c):04X}" for c in text if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise SpecError(f"output {uri!r} holds control characters ({', '.join(bad)}): choose a name without them")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise SpecError(f"output bucket {bucket!r} is not a valid S3 bucket name (letters, digits, "
                            "'.', '-' and '_' only)")
        if len(key.encode()) > _S3_KEY_BYTES - _OUTPUT_ROOM:
            raise SpecError(f"output prefix is {len(key.encode())} bytes: S3 keys hold {_S3_KEY_BYTES}, and vitbatch "
                            f"needs {_OUTPUT_ROOM} of them for its own names; choose a shorter prefix")
        return uri
    path = text
    longest = max(path.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > _NAME_BYTES:
        raise SpecError(f"output folder name {longest[:40]!r}... is {len(longest.encode())} bytes: file names "
                        f"hold at most {_NAME_BYTES}")
    if len(path.encode()) > _LOCAL_PATH_BYTES - _OUTPUT_ROOM:
        raise SpecError(f"output path is {len(path.encode())} bytes: too long for the files vitbatch writes under it")
    return uri



def check_prefix_free(spec: OutputSpec, store: ObjectStore, overwrite: bool) -> None:
    """A used prefix (any earlier job, finished or not, or a model saved there) needs --overwrite;
    an output inside the job's input would become the next run's input."""
    inputs = [getattr(spec, name, None) for name in ("input", "train", "val")]
    for source in filter(None, inputs):
        if spec.output.rstrip("/").startswith(source.rstrip("/") + "/") or spec.output.rstrip("/") == source.rstrip("/"):
            raise SpecError(f"output {spec.output} lies inside the job's input {source}: its parts, overlays and "
                            "models would be read as inputs by the next run; choose an output outside it")
    if overwrite:
        return
    holder = prefix_holder(spec.output, store)
    if holder is not None:
        raise SpecError(f"{spec.output} already holds job {holder.job_id or '?'}: pass --overwrite to replace "
                        f"it, `vitbatch retry {holder.job_id or 'JOB'}` to finish it, or choose a new output")
    for name in (SUCCESS_FILE, MODEL_CONFIG_FILE):
        if store.exists(join(spec.output, name)):
            raise SpecError(f"{spec.output} already holds a finished job or model ({name}); choose a new output "
                            "or pass --overwrite")
