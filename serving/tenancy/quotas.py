"""Per-tenant quotas and request priority.

Three limits, checked at create time in this order (cheapest first):

1. **Queued and running jobs** (``check_job_caps``): a pure decision on the tenant's
   counts, which the job store keeps. ``max_concurrent_jobs`` bounds *running* jobs: a
   job over it is accepted and waits queued (fair share skips the tenant while it is at
   its cap), unless ``max_queued_jobs`` is 0, in which case it is refused.
   ``max_queued_jobs`` bounds the jobs waiting: beyond it, 429.
2. **Jobs per minute** (``RateLimiter.acquire``): a sliding 60 s window, exact (every
   accepted create is a timestamp), shared by every ingress replica through Redis (one
   Lua script: trim, count, add, atomically, on Redis's clock) or SQLite (one
   ``BEGIN IMMEDIATE`` transaction) on one machine. Refusals carry ``retry_after_s``:
   when the oldest create in the window leaves it.

Every refusal raises ``QuotaExceeded`` (429 / RESOURCE_EXHAUSTED, ``Retry-After``).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from serving.errors import InvalidRequest
from serving.tenancy.auth import Tenant
from serving.tenancy.errors import QuotaExceeded
from serving.tenancy.redis_connection import connect_redis, unavailable_on_redis_errors
from serving.tenancy.sqlite_connection import SQLiteFile

__all__ = [
    "Priority",
    "parse_priority",
    "TenantJobCounts",
    "Admission",
    "check_job_caps",
    "RateDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "SQLiteRateLimiter",
    "InProcessRateLimiter",
    "check_rate",
    "RATE_WINDOW_S",
]

RATE_WINDOW_S = 60.0
_MAX_RETRY_AFTER_S = 600


class Priority(IntEnum):
    """A request's priority within its tenant: higher is claimed first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


def parse_priority(value: str | None, max_priority: str = "normal", field: str = "priority") -> Priority:
    """``low`` / ``normal`` / ``high`` (any case) up to the tenant's maximum; unset is normal, or the maximum if lower."""
    ceiling = Priority[max_priority.upper()]
    if value is None or (isinstance(value, str) and not value.strip()):
        return min(Priority.NORMAL, ceiling)
    if not isinstance(value, str):
        raise InvalidRequest(field, "must be one of low, normal, high")
    name = value.strip().lower()
    allowed = [p.name.lower() for p in Priority]
    if name not in allowed:
        shown = name if len(name) <= 20 else name[:20] + "..."
        raise InvalidRequest(field, f"'{shown}' is not a priority; allowed: {', '.join(allowed)}")
    priority = Priority[name.upper()]
    if priority > ceiling:
        within = ", ".join(p.name.lower() for p in Priority if p <= ceiling)
        raise InvalidRequest(field, f"'{name}' is above your maximum '{ceiling.name.lower()}'; allowed: {within}")
    return priority


# ------------------------------------------------------------------ queued and running jobs


@dataclass(frozen=True)
class TenantJobCounts:
    """A tenant's jobs in the store right now."""

    queued: int
    running: int


@dataclass(frozen=True)
class Admission:
    """The answer to "may this tenant create a job now?"."""

    admitted: bool
    code: str | None = None  # tenant_queue_full | tenant_concurrency | tenant_rate
    message: str = ""
    retry_after_s: int = 0

    def raise_if_refused(self) -> None:
        if not self.admitted:
            raise QuotaExceeded(self.code or "quota", self.message, self.retry_after_s)


ADMITTED = Admission(admitted=True)


def check_job_caps(tenant: Tenant, counts: TenantJobCounts, expected_service_s: float) -> Admission:
    """Refuse when the new job would wait beyond the tenant's ``max_queued_jobs``.

    Jobs that fit under ``max_concurrent_jobs`` (``cap - running`` of them) start as soon
    as the cluster has room and do not count as waiting on the tenant's own cap; without a
    cap every queued job counts. With ``max_queued_jobs: 0`` a tenant at its cap is refused
    (``tenant_concurrency``) instead of queueing. ``expected_service_s`` is how long one job
    runs; Retry-After is the expected time until one of the tenant's running jobs finishes
    (one frees every ``expected_service_s / running`` seconds), between 1 s and 10 min.
    """
    if tenant.max_queued_jobs is None:
        return ADMITTED
    room = max(0, tenant.max_concurrent_jobs - counts.running) if tenant.max_concurrent_jobs is not None else 0
    waiting_after = max(0, counts.queued + 1 - room)
    if waiting_after <= tenant.max_queued_jobs:
        return ADMITTED
    retry_after_s = _clamp_retry(expected_service_s / max(1, counts.running))
    if tenant.max_queued_jobs == 0:
        return Admission(
            False, "tenant_concurrency",
            f"tenant '{tenant.name}' runs {counts.running} jobs, its max_concurrent_jobs, and may queue none; "
            f"retry after {retry_after_s} s",
            retry_after_s,
        )
    return Admission(
        False, "tenant_queue_full",
        f"tenant '{tenant.name}' has {waiting_after - 1} jobs waiting, its max_queued_jobs; retry after {retry_after_s} s",
        retry_after_s,
    )


def _clamp_retry(seconds: float) -> int:
    return int(min(_MAX_RETRY_AFTER_S, max(1, math.ceil(seconds))))


# ------------------------------------------------------------------ jobs per minute


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float  # 0 when allowed; else when the oldest create in the window leaves it
    remaining: int  # creates still allowed in the window after this one


class RateLimiter(Protocol):
    def acquire(self, tenant: str, per_minute: int) -> RateDecision:
        """Count one create for ``tenant`` if fewer than ``per_minute`` happened in the last minute."""


def check_rate(limiter: RateLimiter, tenant: Tenant) -> Admission:
    """Acquire one create from the tenant's jobs-per-minute window (always admitted without a cap)."""
    if tenant.jobs_per_minute is None:
        return ADMITTED
    decision = limiter.acquire(tenant.name, tenant.jobs_per_minute)
    if decision.allowed:
        return ADMITTED
    retry_after_s = _clamp_retry(decision.retry_after_s)
    return Admission(
        False, "tenant_rate",
        f"tenant '{tenant.name}' created {tenant.jobs_per_minute} jobs in the last minute, its jobs_per_minute; "
        f"retry after {retry_after_s} s",
        retry_after_s,
    )


# KEYS[1]: the tenant's window (a sorted set of create ids scored by time in ms). ARGV: limit, window ms, new id.
# Redis's own clock, so replicas with skewed clocks share one window.
_SLIDING_WINDOW = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0, limit - count - 1}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now, 0}
"""


class RedisRateLimiter:
    """Jobs per minute across every ingress replica (cluster mode)."""

    def __init__(self, url: str | None = None, *, client=None, prefix: str = "reelserve:rate:",
                 window_s: float = RATE_WINDOW_S):
        self._redis = client if client is not None else connect_redis(url)
        self._script = self._redis.register_script(_SLIDING_WINDOW)
        self._prefix = prefix
        self._window_ms = int(window_s * 1000)

    @unavailable_on_redis_errors
    def acquire(self, tenant: str, per_minute: int) -> RateDecision:
        allowed, retry_ms, remaining = self._script(
            keys=[self._prefix + tenant], args=[per_minute, self._window_ms, uuid.uuid4().hex]
        )
        return RateDecision(bool(allowed), max(0, int(retry_ms)) / 1000, int(remaining))

    def close(self) -> None:
        self._redis.close()


class SQLiteRateLimiter:
    """Jobs per minute for every process on one machine (the embedded mode)."""

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS rate_events (tenant TEXT NOT NULL, at REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS rate_events_by_tenant ON rate_events (tenant, at)",
    )

    def __init__(self, path: str, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.time):
        self._db = SQLiteFile(path, self._SCHEMA)
        self._window_s = window_s
        self._clock = clock  # one host, one clock

    def acquire(self, tenant: str, per_minute: int) -> RateDecision:
        with self._db.transaction() as db:
            now = self._clock()
            db.execute("DELETE FROM rate_events WHERE tenant = ? AND at <= ?", (tenant, now - self._window_s))
            count = db.execute("SELECT COUNT(*) FROM rate_events WHERE tenant = ?", (tenant,)).fetchone()[0]
            if count < per_minute:
                db.execute("INSERT INTO rate_events (tenant, at) VALUES (?, ?)", (tenant, now))
                return RateDecision(True, 0.0, per_minute - count - 1)
            (oldest,) = db.execute(
                "SELECT at FROM rate_events WHERE tenant = ? ORDER BY at LIMIT 1 OFFSET ?", (tenant, count - per_minute)
            ).fetchone()
            return RateDecision(False, max(0.0, oldest + self._window_s - now), 0)

    def close(self) -> None:
        self._db.close()


class InProcessRateLimiter:
    """Jobs per minute within one process (tests, a single ingress replica)."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str, per_minute: int) -> RateDecision:
        with self._lock:
            now = self._clock()
            events = self._events.setdefault(tenant, deque())
            while events and events[0] <= now - self._window_s:
                events.popleft()
            if len(events) < per_minute:
                events.append(now)
                return RateDecision(True, 0.0, per_minute - len(events))
            oldest = events[len(events) - per_minute]
            return RateDecision(False, max(0.0, oldest + self._window_s - now), 0)

    def close(self) -> None:
        return None
