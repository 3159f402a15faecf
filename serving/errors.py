"""The two kinds of error.

``InvalidRequest`` and friends are per-request and safe to show a client:
they name the field and what is allowed. ``StageDead`` means a replica can no
longer serve; health checks raise it and clients only ever see a generic
message.
"""

from __future__ import annotations

__all__ = [
    "ReelserveError",
    "InvalidRequest",
    "NotFound",
    "Expired",
    "NotReady",
    "Overloaded",
    "JobCancelled",
    "GenerationFailed",
    "KeptOutputLost",
    "StageOutOfMemory",
    "InvalidReference",
    "StoreUnavailable",
    "StageDead",
    "ReplicaLost",
    "PoisonInput",
]


class ReelserveError(Exception):
    """Base class; ``client_message`` is what an API may show."""

    @property
    def client_message(self) -> str:
        return str(self)


class InvalidRequest(ReelserveError):
    """A request field is wrong. ``field`` names it; the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(ReelserveError):
    """No such job."""


class Expired(NotFound):
    """The job's video was kept its time (``storage.results_ttl_s``) and is gone (HTTP 410, gRPC NOT_FOUND)."""


class NotReady(ReelserveError):
    """The job exists but is not in a state that allows the operation."""


class Overloaded(ReelserveError):
    """The system is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobCancelled(ReelserveError):
    """Raised inside a stage to stop work for a cancelled job."""


class GenerationFailed(ReelserveError):
    """A stage failed for this request; the job fails, the replica lives on."""


class KeptOutputLost(GenerationFailed):
    """A hand-off's Ray object is gone and its kept copy is missing or unreadable. ``name`` names the output: the
    runner runs the stage that made it again (a copy kept by an earlier attempt) or the job fails."""

    def __init__(self, name: str):
        super().__init__(name)  # args = (name,): it survives pickling across Ray
        self.name = name

    def __str__(self) -> str:
        return f"the {self.name} of this job is lost (its producer is gone and no readable copy was kept)"


class StageOutOfMemory(GenerationFailed):
    """A stage ran out of (GPU) memory for this request; the replica freed what it held and serves on."""

    def __init__(self, stage: str):
        super().__init__(f"the {stage} stage ran out of memory")
        self.stage = stage


class InvalidReference(GenerationFailed):
    """One of the job's inputs decoded as its type at admission but is corrupt inside (a truncated MP4, broken
    AAC). ``name`` is the input as the client sent it (e.g. ``references[2]``); the job fails with code
    ``invalid_reference``, the replica serves on."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


class StoreUnavailable(ReelserveError):
    """The job store cannot be reached right now (clients get 503 / UNAVAILABLE)."""


class StageDead(ReelserveError):
    """The replica cannot serve any more (health check failure)."""


class ReplicaLost(ReelserveError):
    """The replica holding a stage call is lost (its GPU broke, or a rank of its group died) and ends.

    ``blamed``: the call's own input was in the pass that broke the device. The caller hands the call to another
    replica; a job blamed for two lost replicas is quarantined (``PoisonInput``).
    """

    def __init__(self, stage: str, reason: str, blamed: bool = False):
        super().__init__(f"a {stage} replica was lost ({reason})")
        self.stage, self.reason, self.blamed = stage, reason, blamed

    def __reduce__(self):
        return (ReplicaLost, (self.stage, self.reason, self.blamed))


class PoisonInput(GenerationFailed):
    """The job's input broke replicas of a stage again and again: it is set aside and not retried."""

    def __init__(self, stage: str, replicas: int):
        super().__init__(f"this request broke {replicas} {stage} replicas; it was set aside and will not be retried")
        self.stage, self.replicas = stage, replicas

    def __reduce__(self):
        return (PoisonInput, (self.stage, self.replicas))
