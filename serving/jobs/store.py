"""The job store interface and its factory.

Two real backends implement it: SQLite (embedded default, one machine) and
Redis (cluster mode). Every method is short and synchronous; updates to a
job that already reached a terminal state are ignored, so a late progress
write can never resurrect a finished job.
"""

from __future__ import annotations

from typing import Protocol

from serving.jobs.record import JobRecord

__all__ = ["JobStore", "open_store", "ACTIVE_FIELDS"]

# Fields that only the running orchestrator or a stage changes while the job is active.
ACTIVE_FIELDS = frozenset(
    {"status", "progress", "stage", "step", "total_steps", "started_at", "completed_at", "error_code",
     "error_message", "result_path", "result_bytes", "stage_seconds", "owner", "lease_until", "attempts"}
)


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


def open_store(backend: str, *, sqlite_path: str | None = None, redis_url: str | None = None) -> JobStore:
    if backend == "sqlite":
        from serving.jobs.sqlite_store import SQLiteJobStore

        return SQLiteJobStore(sqlite_path)
    if backend == "redis":
        from serving.jobs.redis_store import RedisJobStore

        return RedisJobStore(redis_url)
    raise ValueError(f"jobs.backend: unknown job store '{backend}'; allowed: sqlite, redis")
