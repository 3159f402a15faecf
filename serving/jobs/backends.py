"""Opening the job store the config names: SQLite (one machine) or Redis (a cluster)."""

from __future__ import annotations

from serving.jobs.redis_store import RedisJobStore
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.jobs.store import JobStore

__all__ = ["open_store"]


def open_store(backend: str, *, sqlite_path: str | None = None, redis_url: str | None = None) -> JobStore:
    if backend == "sqlite":
        return SQLiteJobStore(sqlite_path)
    if backend == "redis":
        return RedisJobStore(redis_url)
    raise ValueError(f"jobs.backend: unknown job store '{backend}'; allowed: sqlite, redis")
