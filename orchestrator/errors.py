"""Every exception the control plane raises, in one tree."""


class VitbatchError(Exception):
    """Base of every vitbatch error; its message is meant for the user."""


class NotRetryable(VitbatchError):
    """Retrying cannot help: a task that raises one fails its job once, with this reason."""


class SpecError(NotRetryable):
    """A job spec is invalid (at submit: nothing was enqueued; on a worker: the job fails with why)."""


class StorageError(VitbatchError):
    """An object store could not be read or written."""


class ObjectNotFound(StorageError):
    """The object or prefix does not exist."""


class ObjectTooLarge(StorageError):
    """The object is larger than the configured byte cap; it was not downloaded."""


class ObjectExists(StorageError):
    """A create-only write found the object already there."""


class UnsafeKey(StorageError):
    """A key would escape its prefix (`..`, absolute path, empty segment)."""


class ObjectUnreadable(StorageError):
    """The object is there but retrying will not make it readable (permission denied, archived,
    symlink loop, name too long, not a regular file): one error row, never a failed shard."""


class OutsideInput(ObjectUnreadable):
    """The object lies outside the job's input prefix (a forged manifest line, a symlink out); not opened."""


class ConfigError(VitbatchError):
    """The settings (VITBATCH_* variables) contradict each other; nothing was started."""


class ServerNotReady(VitbatchError):
    """A server vitbatch starts itself (the embedded Redis) exited or did not answer in time."""


class BrokerUnavailable(VitbatchError):
    """Redis could not be reached; nothing was enqueued."""


class JobNotFound(VitbatchError):
    """No job with that id is recorded in Redis."""


class StaleDelivery(VitbatchError):
    """A delivery's lease token is no longer its shard's, or its job has ended: it writes nothing more.

    `state` is the job's state when it has ended ("" when another delivery holds the shard)."""

    def __init__(self, message: str, state: str = "") -> None:
        super().__init__(message)
        self.state = state


class OutputBusy(SpecError):
    """Another live job holds the output prefix; nothing was written."""


class OutputNotFound(VitbatchError):
    """No succeeded job (or no such job) at an output prefix."""


class CorruptOutput(VitbatchError):
    """A committed part does not match the sha256 its job recorded."""
