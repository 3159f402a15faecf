"""A replica that knows when it is lost.

Out of memory fails one request and the replica serves on (``serving.stages._base``). A CUDA error of another
kind, or a rank group that lost a member, leaves the process unable to compute: every later request would fail
fast while the replica looks idle, so Serve would send it more. Instead the replica is *lost*:

- the calls it holds end with ``ReplicaLost`` (``blamed`` for the requests whose own pass broke the device), so
  the runner hands them to another replica, resuming diffusion from its last checkpoint, and counts the blame;
- new calls are refused with the same error, ``check_health`` raises;
- and the process ends a moment later (the CUDA context cannot be repaired in place), so Serve replaces the
  replica at once instead of after three failed health checks.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from serving import metrics
from serving.device_errors import DeviceFailure
from serving.errors import ReplicaLost, StageDead

__all__ = ["EXIT_GRACE_S", "ReplicaHealth"]

logger = logging.getLogger("ray.serve.reelserve.health")

EXIT_GRACE_S = 2.0  # time for the lost replica's answers to leave before its process ends


class ReplicaHealth:
    def __init__(self, stage: str, model: str = "unknown"):
        self.stage, self.model = stage, model
        self.lost: str | None = None  # why, once lost
        self._lock = threading.Lock()

    def lose(self, reason: str, code: DeviceFailure) -> None:
        """This replica can no longer compute: refuse work from now on and end the process shortly."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
        logger.error("%s replica lost (%s): %s; its calls are handed on and the process ends", self.stage, code, reason)
        metrics.replica_lost(self.stage, self.model, code)
        threading.Thread(target=self._end, name="replica-lost", daemon=True).start()

    def error(self, blamed: bool = False) -> ReplicaLost:
        return ReplicaLost(self.stage, self.lost or "unknown", blamed=blamed)

    def refuse(self) -> None:
        """Raise ``ReplicaLost`` for a call arriving at a lost replica (not its input's fault)."""
        if self.lost is not None:
            raise self.error(blamed=False)

    def check(self) -> None:
        """For ``check_health``: a lost replica is dead."""
        if self.lost is not None:
            raise StageDead(f"the {self.stage} replica is lost: {self.lost}")

    def _end(self) -> None:
        time.sleep(EXIT_GRACE_S)
        os._exit(70)  # EX_SOFTWARE: Serve sees the replica's actor die and starts another at once
