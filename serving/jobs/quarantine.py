"""Inputs that break replicas: each job's strikes, kept across attempts; two strikes and it is set aside.

A stage call can end because its replica was lost:

- ``ReplicaLost`` with ``blamed``: the call's own pass broke the device (a CUDA error other than out of memory):
  a strike against the job;
- ``ReplicaLost`` without blame: the replica was lost for another reason (a batch-mate's pass, a worker rank
  that died): no strike;
- the replica's process died with the call in flight (Ray's ``ActorDiedError``): the runner cannot tell whose
  fault it was, so it counts a strike (the job "killed" a replica).

After the first strike the job is a suspect: its later calls run in a batch of their own (``JobTicket.isolate``),
so a second strike is its own, and its former batch-mates, retried apart from it, complete. At
``QUARANTINE_AFTER`` strikes the job fails with ``poison_input`` instead of breaking a third replica.

Strikes are kept with the job's stage outputs (like the fault counters, per attempt: each attempt keeps the
running total), so a takeover after the runner died knows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from serving.errors import ReplicaLost
from serving.jobs.failures import replica_died
from serving.storage.codec import codec

__all__ = ["QUARANTINE_AFTER", "STRIKES", "StrikeCount", "Strikes", "strike_of"]

QUARANTINE_AFTER = 2  # replicas a job may break before it is set aside
STRIKES = "replica_strikes"  # the kept output holding a job's strike count


@codec.register
@dataclass(frozen=True)
class StrikeCount:
    """Replicas a job has broken, over its attempts so far."""

    strikes: int


def strike_of(error: BaseException) -> bool | None:
    """Did a failed stage call lose its replica, and is the job to blame? None: the replica was not lost."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, ReplicaLost):
        return cause.blamed
    if replica_died(error):
        return True  # it died with the call in flight: counted, whoever's fault it was
    return None


class Strikes:
    """One job's strikes, read once per attempt and written back on each new one."""

    def __init__(self, job_id: str, attempt: int, storage: Any, io: Callable[..., Awaitable[Any]]):
        """``storage``: the job's ``JobStorage`` (None: strikes of this attempt only)."""
        self.job_id, self.attempt, self._storage, self._io = job_id, attempt, storage, io
        self._count: int | None = None

    async def count(self) -> int:
        if self._count is None:
            self._count = 0
            if self._storage is not None:
                try:
                    kept = await self._io(self._storage.load_output, self.job_id, self.attempt, STRIKES)
                    self._count = kept.strikes if isinstance(kept, StrikeCount) else 0
                except Exception:  # noqa: BLE001 - unreadable: start from none (a strike more is the worst case)
                    self._count = 0
        return self._count

    async def add(self) -> int:
        """One more strike (kept with the job); the new count."""
        count = await self.count() + 1
        self._count = count
        if self._storage is not None:
            try:
                await self._io(self._storage.keep_output, self.job_id, self.attempt, STRIKES, StrikeCount(count))
            except Exception:  # noqa: BLE001 - kept in this attempt at least; a takeover may count one less
                pass
        return count
