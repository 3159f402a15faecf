"""The job store interface, its write rules, and its factory.

Two real backends implement it: SQLite (embedded default, one machine) and
Redis (cluster mode). Rules both enforce atomically:

- **Fenced writes.** An orchestrator owns a job through a claim, which gives it
  a ``Fence`` (its name and the job's attempt number). Every write about a
  running job carries the fence and is refused unless it is the current
  owner's current attempt, so a stalled or replaced orchestrator (or a stage
  still working for it) can never overwrite its successor's state.
- **One clock.** Leases are measured on the store's clock (Redis ``TIME``; the
  SQLite host's clock), never on each node's.
- **Terminal is final; progress only rises.** A finished job takes no more
  writes, and ``progress`` never goes down, whoever writes it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from serving.errors import StoreUnavailable
from serving.jobs.record import JobRecord
from serving.protocol import Fence, JobStatus
from serving.tenancy.fair_share import QueuedJob

__all__ = [
    "Fence", "JobStore", "StoreUnavailable", "ConditionalWrites", "QueueSnapshot", "TenantLoad", "TenantCheck",
    "snapshot_of",
]

# Called inside create's transaction with the tenant's (queued, running) counts; raises to refuse the job.
TenantCheck = Callable[[int, int], None]


@dataclass(frozen=True)
class TenantLoad:
    """A tenant's running jobs (claimed at least once, not ended) and when its newest one started."""

    running: int = 0
    last_started_at: float | None = None


@dataclass(frozen=True)
class QueueSnapshot:
    """What the runner's claim loop needs in one read: who waits, who runs, what was orphaned."""

    now: float
    orphaned: list[str] = field(default_factory=list)  # started jobs whose owner's lease lapsed (or handed back)
    queued: list[QueuedJob] = field(default_factory=list)  # never claimed, oldest first
    tenants: dict[str, TenantLoad] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)  # queued past their wait bound: to end as expired

    @property
    def running(self) -> int:
        return sum(load.running for load in self.tenants.values())


class JobStore(Protocol):
    def now(self) -> float:
        """The store's clock, in seconds: the one clock leases are measured on."""

    def create(self, record: JobRecord, max_active: int | None = None, check_tenant: TenantCheck | None = None) -> bool:
        """Insert a new job; with ``max_active``, only while fewer jobs are active (atomically). Whether it did.

        ``check_tenant(queued, running)`` sees the record's tenant's counts in the same transaction and raises
        to refuse the job (its quotas)."""

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or ``None``."""

    def list(self, *, after: str | None, limit: int, order: str, tenant: str | None = None) -> tuple[list[JobRecord], bool]:
        """A page of jobs by creation time (``order`` asc/desc) after the job ``after``, of one tenant when given;
        and whether more exist."""

    def queue_snapshot(self, grace_s: float) -> QueueSnapshot:
        """The active jobs as the claim loop sees them (orphans use ``grace_s`` as ``claimable`` does)."""

    def heartbeat(self, stage: str, replica: str, info: dict, ttl_s: float) -> None:
        """A live replica of ``stage`` says it is ready (``info``: its slots, measured rates) for ``ttl_s``."""

    def live_replicas(self, stage: str) -> builtins.list[dict]:
        """The ``info`` of every replica of ``stage`` whose heartbeat has not lapsed."""

    def forget_replica(self, stage: str, replica: str) -> None:
        """A replica that stops says so: it no longer counts as capacity (no wait for its heartbeat to lapse)."""

    def webhooks_pending(self, limit: int = 100) -> builtins.list[str]:
        """Ended jobs whose callback still has to be delivered."""

    def claim(self, job_id: str, owner: str, lease_s: float, grace_s: float | None = None) -> JobRecord | None:
        """Take an active job nobody holds (queued, handed over, or its lease expired ``grace_s`` ago); return it, or ``None``.

        The returned record's ``attempts`` is the new attempt: ``Fence(job_id, owner, record.attempts)``.
        An owner whose lease ran out keeps the job for ``grace_s`` more (default: one more lease), so an
        owner that was only cut off from the store can renew first.
        """

    def renew(self, fence: Fence, lease_s: float) -> bool:
        """Extend the lease; False when the fence is no longer current (someone else owns the job now)."""

    def release(self, fence: Fence) -> bool:
        """Hand the job back (shutdown): the next claim takes it at once and is not counted as a takeover."""

    def update(self, fence: Fence, **changes) -> bool:
        """Apply ``changes`` if the fence is current and the job not terminal; return whether it did."""

    def finish(self, fence: Fence, **changes) -> bool:
        """Apply terminal ``changes`` (must set a terminal status) once, if the fence is current."""

    def request_cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        """Flag the job for cancellation (and deletion once stopped); return it, or ``None`` if unknown.

        A job still queued (nobody ever claimed it) ends ``cancelled`` at once: no orchestrator capacity is needed.
        """

    def is_cancel_requested(self, job_id: str) -> bool:
        """Cheap check, called once per denoising step."""

    def delete(self, job_id: str) -> bool:
        """Remove the record."""

    def expire(self, job_id: str) -> JobRecord | None:
        """A queued job past its queue wait becomes expired (None: it is not one)."""

    def claimable(self, grace_s: float, limit: int = 100) -> builtins.list[str]:
        """Active jobs nobody holds: queued, handed over, or whose owner's lease expired ``grace_s`` ago (oldest first)."""

    def count_active(self) -> int:
        """Jobs queued or in progress."""

    def active_records(self, limit: int = 1000) -> builtins.list[JobRecord]:
        """Jobs queued or in progress (what admission sizes the backlog from)."""

    def close(self) -> None:
        """Release connections."""


class ConditionalWrites:
    """The write rules both backends share, on top of their one atomic primitive.

    A backend provides ``_modify(job_id, decide) -> JobRecord | None``: read the
    record, call ``decide(record, now)`` which returns the changes to apply (or
    ``None`` to refuse), and apply them atomically with the read.
    """

    def _modify(self, job_id: str, decide) -> JobRecord | None:
        raise NotImplementedError

    # -- owner's writes (fenced)

    def claim(self, job_id: str, owner: str, lease_s: float, grace_s: float | None = None) -> JobRecord | None:
        grace_s = lease_s if grace_s is None else grace_s

        def decide(record: JobRecord, now: float) -> dict | None:
            if record.status.is_terminal or (record.owner is not None and record.lease_until + grace_s >= now):
                return None
            crashed = record.owner is not None  # it had an owner whose lease ran out without a hand-over
            return {
                "owner": owner, "lease_until": now + lease_s, "attempts": record.attempts + 1,
                "takeovers": record.takeovers + (1 if crashed else 0),
            }

        return self._modify(job_id, decide)

    def renew(self, fence: Fence, lease_s: float) -> bool:
        return self._fenced(fence, lambda record, now: {"lease_until": now + lease_s}) is not None

    def release(self, fence: Fence) -> bool:
        return self._fenced(fence, lambda record, now: {"owner": None, "lease_until": 0.0}) is not None

    def update(self, fence: Fence, **changes) -> bool:
        return self._fenced(fence, lambda record, now: _monotonic(record, changes)) is not None

    def finish(self, fence: Fence, **changes) -> bool:
        if "status" not in changes or not JobStatus(changes["status"]).is_terminal:
            raise ValueError("finish() needs a terminal status")
        changes = {**changes, "owner": None, "lease_until": 0.0}
        return self._fenced(fence, lambda record, now: _monotonic(record, changes)) is not None

    def _fenced(self, fence: Fence, decide) -> JobRecord | None:
        def checked(record: JobRecord, now: float) -> dict | None:
            if record.status.is_terminal or record.owner != fence.owner or record.attempts != fence.attempt:
                return None
            return decide(record, now)

        return self._modify(fence.job_id, checked)

    # -- clients' writes (flags only; the owner acts on them)

    def expire(self, job_id: str) -> JobRecord | None:
        """End a job that nobody ever claimed and that waited past its bound as ``expired``."""

        def decide(record: JobRecord, now: float) -> dict | None:
            if not _waited_too_long(record, now):
                return None
            return {"status": JobStatus.EXPIRED, "stage": "expired", "completed_at": now, "error_code": "queue_timeout",
                    "error_message": f"the job waited {record.max_queue_wait_s:g} s in the queue without starting"}

        return self._modify(job_id, decide)

    def lease_webhook(self, job_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Take the delivery of an ended job's callback (nobody else delivers it while the lease holds)."""

        def decide(record: JobRecord, now: float) -> dict | None:
            state = dict(record.webhook or {})
            if not _webhook_due(record) or state.get("lease_until", 0.0) > now:
                return None
            return {"webhook": {**state, "owner": owner, "lease_until": now + lease_s}}

        return self._modify(job_id, decide)

    def record_webhook(self, job_id: str, owner: str, outcome: dict) -> bool:
        """Record a delivery's outcome (the holder of the delivery's lease only); the lease ends with it."""

        def decide(record: JobRecord, now: float) -> dict | None:
            state = dict(record.webhook or {})
            if state.get("owner") != owner:
                return None
            return {"webhook": {**state, **outcome, "owner": None, "lease_until": 0.0}}

        return self._modify(job_id, decide) is not None

    def request_cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        def decide(record: JobRecord, now: float) -> dict:
            changes: dict[str, Any] = {"cancel_requested": True}
            if delete:
                changes["delete_requested"] = True
            if record.status == JobStatus.QUEUED and record.owner is None and record.attempts == 0:
                changes.update(status=JobStatus.CANCELLED, stage="cancelled", completed_at=now)
            return changes

        return self._modify(job_id, decide)


def _waited_too_long(record: JobRecord, now: float) -> bool:
    fresh = record.status == JobStatus.QUEUED and record.owner is None and record.attempts == 0
    return fresh and record.max_queue_wait_s is not None and now > record.created_at + record.max_queue_wait_s


def _webhook_due(record: JobRecord) -> bool:
    """An ended job with a callback that was not yet delivered (nor given up on)."""
    state = record.webhook or {}
    return record.status.is_terminal and bool(record.callback_url) and not state.get("done", False)


def snapshot_of(records: list[JobRecord], now: float, grace_s: float) -> QueueSnapshot:
    """The claim loop's view of the active records (both stores read them, then share this rule)."""
    snapshot = QueueSnapshot(now=now)
    running: dict[str, list[float]] = {}
    for record in sorted(records, key=lambda r: (r.created_at, r.id)):
        if record.status.is_terminal:
            continue
        lapsed = record.owner is None or record.lease_until + grace_s < now
        if record.attempts == 0 and record.owner is None:
            if _waited_too_long(record, now):
                snapshot.expired.append(record.id)
            else:
                snapshot.queued.append(QueuedJob(record.id, record.tenant, record.priority, record.created_at))
            continue
        running.setdefault(record.tenant, []).append(record.started_at or record.created_at)
        if lapsed:
            snapshot.orphaned.append(record.id)
    for tenant, starts in running.items():
        snapshot.tenants[tenant] = TenantLoad(running=len(starts), last_started_at=max(starts))
    return snapshot


def _monotonic(record: JobRecord, changes: dict) -> dict:
    """``progress`` never goes down, whoever writes it (a retried stage starts its marks from the bottom)."""
    if "progress" in changes:
        changes = {**changes, "progress": max(record.progress, int(changes["progress"]))}
    return changes
