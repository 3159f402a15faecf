"""The job store interface and its factory.

Two real backends implement it: SQLite (embedded default, one machine) and
Redis (cluster mode). Every method is short and synchronous; updates to a
job that already reached a terminal state are ignored, so a late progress
write can never resurrect a finished job.
"""

from __future__ import annotations

from typing import Protocol

from serving.jobs.record import JobRecord

from serving.protocol import JobStatus

__all__ = ["JobStore", "ConditionalWrites", "open_store"]


class JobStore(Protocol):
    def create(self, record: JobRecord) -> None:
        """Insert a new job."""

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or ``None``."""

    def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        """A page of jobs by creation time (``order`` asc/desc) after the job ``after``; and whether more exist."""

    def update(self, job_id: str, **changes) -> bool:
        """Apply ``changes`` if the job exists and is not terminal; return whether it did."""

    def finish(self, job_id: str, **changes) -> bool:
        """Apply terminal ``changes`` (must set a terminal status) once; later calls return False."""

    def request_cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        """Flag the job for cancellation (and deletion once stopped); return it, or ``None`` if unknown."""

    def is_cancel_requested(self, job_id: str) -> bool:
        """Cheap check, called once per denoising step."""

    def delete(self, job_id: str) -> bool:
        """Remove the record."""

    def claim(self, job_id: str, owner: str, lease_s: float, now: float) -> bool:
        """Take ownership if the job is active and unowned, its lease expired, or already ours."""

    def orphans(self, now: float, limit: int = 100) -> list[str]:
        """Active jobs whose lease expired (their orchestrator died)."""

    def count_active(self) -> int:
        """Jobs queued or in progress."""

    def close(self) -> None:
        """Release connections."""


class ConditionalWrites:
    """The write rules both backends share, on top of their one atomic primitive.

    A backend provides ``_modify(job_id, changes, must_be_active) -> JobRecord | None``:
    apply ``changes`` atomically, unless the job is missing, or terminal while
    ``must_be_active`` is set.
    """

    def _modify(self, job_id: str, changes: dict, must_be_active: bool) -> JobRecord | None:
        raise NotImplementedError

    def update(self, job_id: str, **changes) -> bool:
        return self._modify(job_id, changes, must_be_active=True) is not None

    def finish(self, job_id: str, **changes) -> bool:
        if "status" not in changes or not JobStatus(changes["status"]).is_terminal:
            raise ValueError("finish() needs a terminal status")
        return self._modify(job_id, changes, must_be_active=True) is not None

    def request_cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        changes = {"cancel_requested": True}
        if delete:
            changes["delete_requested"] = True
        return self._modify(job_id, changes, must_be_active=False)


def open_store(backend: str, *, sqlite_path: str | None = None, redis_url: str | None = None) -> JobStore:
    if backend == "sqlite":
        from serving.jobs.sqlite_store import SQLiteJobStore

        return SQLiteJobStore(sqlite_path)
    if backend == "redis":
        from serving.jobs.redis_store import RedisJobStore

        return RedisJobStore(redis_url)
    raise ValueError(f"jobs.backend: unknown job store '{backend}'; allowed: sqlite, redis")
