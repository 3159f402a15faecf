"""Which errors mean the replica itself is lost, not just the request that met them.

Out of memory is a per-request failure: the replica frees what it held and
serves on. A CUDA error of another kind (an illegal memory access, an ECC
error, a launch failure, a device-side assert, an Xid the driver reports) is
sticky: the process's CUDA context is unusable from then on, and every later
request would fail fast while the replica looks idle. A broken rank group (a
worker rank died, a collective lost its peer) is the same for a replica that
spans several GPUs. Both end the replica (``serving.stages.health``).

``device_failure`` tells which: ``"device"`` (the request's own pass broke the
device: it is to blame), ``"group"`` (a rank or the link between ranks went
away: nobody's input is to blame), or ``None`` (a per-request error).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["DeviceFailure", "device_failure", "injected_device_error"]

DeviceFailure = Literal["device", "group"]

# Lower-case fragments of CUDA runtime / driver / library messages that leave the context unusable.
_DEVICE_MARKERS = (
    "illegal memory access",
    "uncorrectable ecc",
    "ecc error",
    "unspecified launch failure",
    "launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cuda driver error",
    "gpu has fallen off the bus",
)
# A rank group that lost a member: NCCL / gloo messages, and Ray's for a worker actor that died.
_GROUP_MARKERS = (
    "nccl error",
    "ncclremoteerror",
    "ncclsystemerror",
    "communicator was aborted",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo/transport",
)
_DEAD_ACTOR_TYPES = {"ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError", "GetTimeoutError"}


def device_failure(error: BaseException | None) -> DeviceFailure | None:
    """``"device"``, ``"group"`` or ``None`` for a per-request error (out of memory included)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        kind = _one(error)
        if kind is not None:
            return kind
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _one(error: BaseException) -> DeviceFailure | None:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return None
    if type(error).__name__ in _DEAD_ACTOR_TYPES or isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return "group"
    text = str(error).lower()
    if isinstance(error, torch.AcceleratorError) or any(marker in text for marker in _DEVICE_MARKERS):
        return "device"
    if any(marker in text for marker in _GROUP_MARKERS):
        return "group"
    return None


def injected_device_error(stage: str) -> torch.AcceleratorError:
    """What the ``device_error`` and ``poison_input`` faults raise: the error a broken GPU gives."""
    return torch.AcceleratorError(f"CUDA error: an illegal memory access was encountered (injected fault in {stage})")
