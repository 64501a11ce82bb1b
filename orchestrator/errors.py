"""Every exception the control plane raises, in one tree."""


class VitbatchError(Exception):
    """Base of every vitbatch error; its message is meant for the user."""


class SpecError(VitbatchError):
    """A job spec is invalid; nothing was enqueued."""


class StorageError(VitbatchError):
    """An object store could not be read or written."""


class ObjectNotFound(StorageError):
    """The object or prefix does not exist."""


class ObjectTooLarge(StorageError):
    """The object is larger than the configured byte cap; it was not downloaded."""


class UnsafeKey(StorageError):
    """A key would escape its prefix (`..`, absolute path, empty segment)."""


class BrokerUnavailable(VitbatchError):
    """Redis could not be reached; nothing was enqueued."""


class JobNotFound(VitbatchError):
    """No job with that id is recorded in Redis."""
