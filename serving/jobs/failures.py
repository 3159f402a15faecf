"""How a job's failures are named: the stage they belong to, and the one clean line a client reads."""

from __future__ import annotations

from serving.errors import InvalidReference, KeptOutputLost, PoisonInput, ReelserveError, StageOutOfMemory
from serving.storage.errors import StorageError

__all__ = ["StageFailure", "LeaseLost", "client_safe_error", "kept_output_lost", "replica_died"]


class StageFailure(Exception):
    """A stage failed for this job; ``stage`` names it."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error!r}")
        self.stage = stage
        self.error = error


class LeaseLost(Exception):
    """Another runner owns the job now; this one stops without writing."""


def replica_died(error: BaseException) -> bool:
    """Ray's ways of saying the replica serving a call is gone, and ours (``ReplicaLost``: its device broke); the
    call may be retried elsewhere."""
    names = {type(error).__name__, type(getattr(error, "cause", None) or error).__name__}
    return bool(names & {"ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError", "ReplicaLost"})


def kept_output_lost(error: BaseException) -> str | None:
    """The name of the kept hand-off a stage could not read (``KeptOutputLost``), else ``None``."""
    cause = getattr(error, "cause", None) or error
    return cause.name if isinstance(cause, KeptOutputLost) else None


def client_safe_error(error: BaseException, stage: str, size: str = "") -> tuple[str, str]:
    """An error code and a one-line message for the client: no tracebacks, paths or addresses.

    Only our own errors carry their text through; anything else is named by its type and the stage.
    """
    cause = getattr(error, "cause", None) or error
    name = type(cause).__name__
    at = f" at {size}" if size else ""
    if isinstance(cause, StageOutOfMemory) or "OutOfMemory" in name or "out of memory" in str(cause).lower():
        return "resource_exhausted", f"the {stage} stage ran out of memory{at}; try a smaller size or fewer seconds"
    if "BackPressure" in name:
        return "overloaded", f"the {stage} stage was full; retry later"
    if replica_died(error):
        return "stage_unavailable", f"a {stage} replica died while generating this video, also when retried; retry later"
    if isinstance(cause, StorageError):  # full, or unreachable for longer than storage.outage_wait_s
        return "storage_unavailable", f"the {stage} stage could not use storage: {cause.client_message}"
    if isinstance(cause, PoisonInput):
        return "poison_input", cause.client_message.splitlines()[0][:300]
    if isinstance(cause, InvalidReference):
        return "invalid_reference", "invalid reference " + cause.client_message.splitlines()[0][:300]
    if isinstance(cause, ReelserveError):
        return "generation_failed", f"the {stage} stage failed: " + cause.client_message.splitlines()[0][:300]
    return "generation_failed", f"the {stage} stage failed ({name})"
