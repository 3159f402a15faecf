"""The queue as the ingress sees it: admission by capacity, and each queued job's position and start estimate.

Read from the job store at most once a second and shared by every request:
the active jobs (what waits, what runs), and the live diffusion replicas'
heartbeats, which carry each replica's measured seconds per token-step, the
rate the autoscaler reads too (a job's wall time in the stage would count its
queue wait and batch sharing). Before any replica has measured, the
config's prior is used.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cluster.admission import AdmissionLimits, JobLoad, admit, backlog_token_steps
from cluster.config import ModelConfig
from serving import metrics
from serving.errors import Overloaded
from serving.jobs.record import JobRecord
from serving.jobs.store import JobStore
from serving.tenancy.fair_share import QueuedJob, RunningJob, TenantState, estimate_queue

__all__ = ["QueueView", "QueueSnapshotView"]

_FRESH_S = 1.0  # how old a reading may be before a request reads the store again


@dataclass
class QueueSnapshotView:
    """One reading: when, the measured rate, the backlog and each queued job's estimate."""

    read_at: float = -1e9
    seconds_per_token_step: float = 0.0
    backlog_token_steps: int = 0
    slots: int = 0
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> queue_position, estimated_start_at


class QueueView:
    def __init__(self, store: JobStore, model: ModelConfig, limits: AdmissionLimits | None,
                 tenants: dict[str, Any], blocking: Callable[..., Awaitable[Any]]):
        self.store, self.model, self.limits, self.tenants = store, model, limits, tenants
        self._blocking = blocking
        self._view = QueueSnapshotView()
        self._reading: asyncio.Future | None = None

    @property
    def prior_rate(self) -> float:
        return self.limits.seconds_per_token_step if self.limits else self.model.seconds_per_token_step

    async def current(self) -> QueueSnapshotView:
        """The latest reading, refreshed when older than a second (one read at a time, shared by all waiting)."""
        if time.monotonic() - self._view.read_at > _FRESH_S:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._blocking(self._read))
            self._view = await asyncio.shield(self._reading)
        return self._view

    async def admit(self, model_name: str) -> None:
        """Refuse a job whose estimated wait, even with diffusion at its maximum replicas, exceeds
        ``jobs.max_queue_wait_s`` (429 with Retry-After from the estimate)."""
        limits = self.limits
        if limits is None or limits.max_queue_wait_s is None:
            return
        view = await self.current()
        answer = admit(view.backlog_token_steps, view.seconds_per_token_step, limits.diffusion_replicas,
                       limits.max_queue_wait_s, min_retry_after_s=limits.retry_after_s)
        if not answer.admitted:
            metrics.admission_refused(model_name, "queue_wait")
            raise Overloaded(answer.reason, retry_after_s=answer.retry_after_s)

    async def estimate(self, record: JobRecord) -> dict[str, Any]:
        """A queued job's ``queue_position`` and ``estimated_start_at`` (empty once it started)."""
        if record.attempts > 0 or record.status.is_terminal:
            return {}
        return (await self.current()).estimates.get(record.id, {})

    # ------------------------------------------------------------------ one reading (a worker thread)

    def _read(self) -> QueueSnapshotView:
        records = self.store.active_records(limit=100_000)
        rates = [info.get("seconds_per_token_step", 0.0) for info in self.store.live_replicas("diffusion")]
        measured = [rate for rate in rates if rate > 0]
        rate = statistics.median(measured) if measured else self.prior_rate
        slots = len(rates) * (self.limits.diffusion_slots if self.limits else 1)
        steps = self.model.num_inference_steps
        loads = {r.id: JobLoad.of(self.model, r.width, r.height, r.seconds, r.fps, max(r.total_steps, steps), r.step)
                 for r in records}
        view = QueueSnapshotView(
            read_at=time.monotonic(), seconds_per_token_step=rate, slots=slots,
            backlog_token_steps=backlog_token_steps(loads.values()),
        )
        view.estimates = self._estimates(records, loads, rate, slots)
        return view

    def _estimates(self, records: list[JobRecord], loads: dict[str, JobLoad], rate: float, slots: int) -> dict:
        now = time.time()
        queued = [QueuedJob(r.id, r.tenant, r.priority, r.created_at) for r in records if r.attempts == 0]
        running = [
            RunningJob(r.tenant, now + loads[r.id].token_steps_left * rate) for r in records if r.attempts > 0
        ]
        counts: dict[str, int] = {}
        for job in running:
            counts[job.tenant] = counts.get(job.tenant, 0) + 1
        tenants = {}
        for name in {job.tenant for job in queued} | set(counts):
            config = self.tenants.get(name)
            tenants[name] = TenantState(
                share=config.share if config else 1.0, running=counts.get(name, 0),
                max_concurrent=config.max_concurrent_jobs if config else None,
            )
        estimates = estimate_queue(
            queued, tenants, now=now, slots=max(slots, 1), running=running,
            service_s=lambda job: loads[job.job_id].token_steps_left * rate,
        )
        return {
            job_id: {"queue_position": e.queue_position,
                     "estimated_start_at": None if e.estimated_start_at is None else round(e.estimated_start_at, 1)}
            for job_id, e in estimates.items()
        }
