"""The order queued jobs are claimed in: weighted fair share across tenants, then priority, then age.

When a runner has room for one more job it takes the first job of ``claim_order``:

1. **Across tenants, weighted fair share.** The tenant with the fewest running jobs per
   unit of ``share`` goes first (share 2 gets twice the running jobs of share 1).
2. **Ties** go to the tenant whose last job started longest ago (a tenant that never
   started one goes first), then to the tenant whose next job is older, then by name, so
   the order is deterministic. The "longest ago" rule matters when few slots exist: with
   one slot every tenant has 0 running jobs at each decision, and without it the
   alphabetically first tenant would take every slot.
3. **Within a tenant**, higher priority first, then older first (then job id).

A tenant at its ``max_concurrent_jobs`` is skipped until one of its jobs ends. Each
pick counts as a running job of its tenant for the picks after it, so one call orders
a whole backlog (A, B, A, A ... for A with 8 jobs and B with 1: B's job is second).

``estimate_queue`` runs the same rule forward in time over the free slots to give each
queued job a ``queue_position`` and an ``estimated_start_at``.

Pure functions of their inputs; the job stores feed them (see the store design).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["QueuedJob", "TenantState", "RunningJob", "QueueEstimate", "claim_order", "estimate_queue"]

_NEVER = (-math.inf, 0)  # "last started" of a tenant that never started a job


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    tenant: str
    priority: int = 1  # serving.tenancy.quotas.Priority: 0 low, 1 normal, 2 high
    created_at: float = 0.0


@dataclass(frozen=True)
class TenantState:
    """What fair share needs to know of a tenant (a tenant missing from the mapping is share 1, nothing running)."""

    share: float = 1.0
    running: int = 0
    last_started_at: float | None = None  # when its most recent job started; None: never (or not known)
    max_concurrent: int | None = None


@dataclass(frozen=True)
class RunningJob:
    tenant: str
    expected_end_at: float


@dataclass(frozen=True)
class QueueEstimate:
    queue_position: int  # 1: the next job to start
    estimated_start_at: float | None  # None: it cannot start (its tenant's cap and no slot ever frees)


def claim_order(queued: Iterable[QueuedJob], tenants: Mapping[str, TenantState]) -> list[QueuedJob]:
    """The queued jobs in the order they should be claimed; jobs of tenants at their cap are left out."""
    queue = _FairQueue(queued, tenants)
    order = []
    while (job := queue.pop(started_at=math.inf)) is not None:  # picks are later than any real start
        order.append(job)
    return order


def estimate_queue(
    queued: Iterable[QueuedJob],
    tenants: Mapping[str, TenantState],
    *,
    now: float,
    slots: int,
    service_s: float | Callable[[QueuedJob], float],
    running: Sequence[RunningJob] = (),
) -> dict[str, QueueEstimate]:
    """Queue position and estimated start of every queued job, by job id.

    ``slots`` jobs run at once; each takes ``service_s`` (seconds, or a function of the job,
    e.g. from its size and steps); ``running`` are the jobs running now with their expected
    ends (their tenants' running counts come from here, not from ``tenants``). Jobs start in
    the order the claim rule picks them as slots free up.
    """
    if slots < 1:
        raise ValueError(f"slots: {slots}; at least 1 job must be able to run")
    duration = service_s if callable(service_s) else (lambda job: service_s)
    counts: dict[str, int] = defaultdict(int)
    ends: list[tuple[float, str]] = []
    for run in running:
        counts[run.tenant] += 1
        heapq.heappush(ends, (max(now, run.expected_end_at), run.tenant))
    states = {name: _with_running(tenants.get(name, TenantState()), counts.get(name, 0))
              for name in set(tenants) | set(counts)}
    queue = _FairQueue(queued, states)
    free = max(0, slots - len(running))
    clock = now
    estimates: dict[str, QueueEstimate] = {}
    while queue:
        job = queue.pop(started_at=clock) if free else None
        if job is not None:
            free -= 1
            estimates[job.job_id] = QueueEstimate(len(estimates) + 1, clock)
            heapq.heappush(ends, (clock + duration(job), job.tenant))
            continue
        if not ends:  # only capped tenants are left and nothing of theirs runs: they never start
            break
        clock, tenant = heapq.heappop(ends)
        queue.finished(tenant)
        free += 1
    for job in queue.remaining():
        estimates[job.job_id] = QueueEstimate(len(estimates) + 1, None)
    return estimates


def _with_running(state: TenantState, running: int) -> TenantState:
    return TenantState(state.share, running, state.last_started_at, state.max_concurrent)


class _FairQueue:
    """Per-tenant queues and a heap of tenants keyed by the claim rule (stale entries skipped by version)."""

    def __init__(self, queued: Iterable[QueuedJob], tenants: Mapping[str, TenantState]):
        by_tenant: dict[str, list[QueuedJob]] = defaultdict(list)
        for job in queued:
            by_tenant[job.tenant].append(job)
        self._jobs = {name: deque(sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id)))
                      for name, jobs in by_tenant.items()}
        self._state = {name: tenants.get(name, TenantState()) for name in self._jobs}
        self._running = {name: state.running for name, state in self._state.items()}
        self._last = {name: _NEVER if s.last_started_at is None else (s.last_started_at, 0)
                      for name, s in self._state.items()}
        self._version = dict.fromkeys(self._jobs, 0)
        self._picks = 0
        self._heap: list[tuple] = []
        for name in self._jobs:
            self._push(name)

    def __bool__(self) -> bool:
        return any(self._jobs.values())

    def pop(self, started_at: float) -> QueuedJob | None:
        """The next job by the claim rule, counted as started at ``started_at``; None if every tenant left is capped."""
        while self._heap:
            *_, version, name = heapq.heappop(self._heap)
            if version != self._version[name]:
                continue
            job = self._jobs[name].popleft()
            self._picks += 1
            self._running[name] += 1
            self._last[name] = (started_at, self._picks)
            self._push(name)
            return job
        return None

    def finished(self, tenant: str) -> None:
        """One of ``tenant``'s running jobs ended: it may be eligible again, and ranks higher."""
        if tenant in self._running:
            self._running[tenant] = max(0, self._running[tenant] - 1)
            self._push(tenant)

    def remaining(self) -> list[QueuedJob]:
        return [job for name in sorted(self._jobs) for job in self._jobs[name]]

    def _push(self, name: str) -> None:
        self._version[name] += 1
        jobs, state = self._jobs[name], self._state[name]
        if not jobs or (state.max_concurrent is not None and self._running[name] >= state.max_concurrent):
            return
        key = (self._running[name] / state.share, self._last[name], jobs[0].created_at, name)
        heapq.heappush(self._heap, (*key, self._version[name], name))
