"""What every job spec is built from: the rules a spec applies to the fields it has (locations,
the output, the model), the field types several kinds share, and the refusals a kind's
`check_checkpoint` gives.

The kinds' specs live by family (imagespecs.py, modelspecs.py, vectorspecs.py) and the union a
spec is parsed as in jobs.py; this module imports none of them, so each can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from orchestrator.errors import SpecError, VitbatchError
from orchestrator.jobspec.checks.outputs import storable_output
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind, classifier_refusal
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.store.storage import normalize_uri

Precision = Literal["auto", "fp16", "bf16", "fp32"]
Decode = Literal["auto", "threads", "processes", "device"]
Device = Literal["auto", "cpu", "cuda"]
Lane = Literal["auto", "interactive", "bulk"]
Pooling = Literal["cls", "pooled", "mean", "patches"]
T = TypeVar("T")
R = TypeVar("R")


def _comma_split(value):
    """`a,b,c` from the command line as a list (blank items dropped); a list passes as it is."""
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


def _distinct(value: list[T]) -> list[T]:
    return list(dict.fromkeys(value))


# The fields several kinds declare alike: a description given once reads the same in each kind's --help.
OutputPrefix = Annotated[str, Field(description="Output prefix (local directory, file:// or s3://).")]
WorkerDevice = Annotated[Device, Field(description="auto picks CUDA when the worker has it.")]
# A list option given as `a,b,c` on the command line (or as a list in a spec file), repeats dropped.
DistinctList = Annotated[list[T], BeforeValidator(_comma_split), AfterValidator(_distinct)]


def _checked(check: Callable[[T], R], value: T) -> R:
    """`check(value)` for a validator: pydantic reports a ValueError as a field error."""
    try:
        return check(value)
    except VitbatchError as e:
        raise ValueError(str(e)) from e


def checked_unless_unset(check: Callable[[T], R], value: T | None) -> R | None:
    """`check(value)` for a validator of a field that may be unset (None passes)."""
    return None if value is None else _checked(check, value)


def _output_uri(value: str) -> str:
    return storable_output(normalize_uri(value))


def refuse_onnx(model: str, needs: str, checkpoint: Checkpoint, config: dict | None) -> None:
    """SpecError for a job that needs the PyTorch model when the checkpoint is an ONNX export (`config` its
    config.json, which names the model it was exported from)."""
    if checkpoint.model_kind is not ModelKind.ONNX:
        return
    source = (config or {}).get("source", {}).get("ref", "its source")
    raise SpecError(f"model {model!r} is an ONNX export: {needs}; pass the model it was exported from ({source})")


def needs_classifier(model: str, checkpoint: Checkpoint) -> None:
    """SpecError, saying what to run instead, for a checkpoint without a trained classifier."""
    if not checkpoint.classifier:
        raise SpecError(classifier_refusal(model, checkpoint))


class BaseSpec(BaseModel):
    """The rules every spec applies to the fields it has: locations, the output and the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("input", "train", "val", "alias", "kept_by", "image_root", check_fields=False)
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        return checked_unless_unset(normalize_uri, value)

    @field_validator("output", check_fields=False)
    @classmethod
    def _output(cls, value: str) -> str:
        return _checked(_output_uri, value)

    @field_validator("model", check_fields=False)
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return checked_unless_unset(normalize_model_ref, value)

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """SpecError when the checkpoint (and its config.json, where read) cannot serve this kind of job.
        Each kind that asks something of its model says what; the rest ask nothing."""
