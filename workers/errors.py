"""Every exception the data plane raises, in one tree."""

from orchestrator.errors import NotRetryable, VitbatchError


class WorkerError(VitbatchError):
    """Base of data-plane errors."""


class BadImage(WorkerError):
    """An object could not be turned into an RGB image; `reason` says why.

    Becomes an error row; never fails the shard.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelLoadError(WorkerError, NotRetryable):
    """A model reference cannot be loaded; retrying will not help."""


class UnsafeCheckpoint(ModelLoadError):
    """A pickle checkpoint was found and pickle loading is not allowed."""


class TrainingDiverged(WorkerError, NotRetryable):
    """The loss became NaN or infinite; the job stops and commits no model."""


class JobCancelled(WorkerError):
    """The job was cancelled while this shard ran; the shard stops without committing."""


class NoSharedMemory(WorkerError):
    """/dev/shm cannot hold a shard's decoded pixels; the shard decodes in threads instead."""


class ShardFailed(WorkerError):
    """A shard ended without output (quarantined, or its job failed): the task ends in FAILURE with why."""


class ExportFailed(WorkerError, NotRetryable):
    """An ONNX export could not be made, or it does not match PyTorch on the sample images; retrying will not help."""
