"""What a storage backend can fail with, in the project's two kinds of error.

``StorageUnavailable`` subclasses the job store's ``StoreUnavailable`` on
purpose: both mean "the outside store cannot be reached right now", and every
caller that already answers 503 / ``UNAVAILABLE`` and retries with backoff for
the job store does the right thing for object storage too, without a new
``except`` clause. ``StorageFull`` does not: a full disk or a bucket over its
quota will not heal by retrying, so the job fails (``storage_unavailable``,
naming the stage) instead of waiting.
"""

from __future__ import annotations

from serving.errors import ReelserveError, StoreUnavailable

__all__ = ["SigningNotSupported", "StorageError", "StorageFull", "StorageUnavailable"]


class StorageError(ReelserveError):
    """The object store refused an operation (permissions, configuration, a malformed request).

    The message names the operation, the key and the backend's answer (paths,
    bucket names): it is for logs. ``client_message`` says only what happened.
    """

    @property
    def client_message(self) -> str:
        return "storage refused the operation"


class StorageUnavailable(StorageError, StoreUnavailable):
    """The object store cannot be reached or answers with server errors (retry later; clients get 503)."""

    @property
    def client_message(self) -> str:
        return "storage is unavailable; retry later"


class StorageFull(StorageError):
    """No room: the disk is full, a quota is exceeded or an object is too large for the store."""

    @property
    def client_message(self) -> str:
        return "storage is full"


class SigningNotSupported(StorageError):
    """The backend cannot hand out signed URLs (local directory, memory, Redis): stream the object instead."""
