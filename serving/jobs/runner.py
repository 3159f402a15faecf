"""The durable job runner: claims jobs under leases and runs each one's family pipeline to a terminal state.

It knows no model. Durability, in order of what can go wrong:

- **Pull, don't push, and only what can run.** Runner replicas pull jobs from
  the store under leases: orphaned ones at once, queued ones only while
  diffusion has a free slot (live diffusion replicas x their slots, less the
  jobs running), in weighted fair share across tenants, then priority, then
  age. So queued jobs wait in the store, where they are visible and ordered,
  not in a stage's queue, and a runner claims nothing until its own stages
  answer. A job queued past its bound ends expired. On shutdown a replica
  hands its jobs back (``release``): the next claim takes them at once.
- **Fenced.** Every write about a job carries the claim's fence
  (``FencedWriter``); a write from a replaced owner is refused, and the
  refusal stops that owner's work.
- **Nothing redone.** The pipeline runs over a ``RunnerJobContext``: stage
  outputs are kept (per attempt) until the job ends, so a takeover skips
  finished stages and diffusion resumes from its last checkpoint.
- **One result.** Each attempt's muxer writes its own MP4; the fenced write
  that completes the job names the attempt whose MP4 is the result
  (``result_attempt``) and when it expires; any other attempt's is removed.
- **Truthful.** A failure names its stage; cancel is honoured at every stage
  boundary and cancels the calls in flight; the deadline counts from the job's
  first start across attempts; every failure of the runner itself still ends
  the job.
- **Store outages.** Writes are queued and sent when the store answers again;
  the job keeps running meanwhile. Every lease lapses during a long outage, so
  for one lease after the store answers again a replica claims only jobs nobody
  owns: the owners renew first, and an outage is not taken for a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cluster.config import JobsConfig, ModelConfig, OrchestratorConfig
from serving import metrics
from serving.errors import JobCancelled, StoreUnavailable
from serving.jobs.context import RunnerJobContext, RunnerServices
from serving.jobs.events import wait_for_event
from serving.jobs.failures import LeaseLost, StageFailure, client_safe_error
from serving.jobs.record import JobRecord, job_spec
from serving.jobs.retention import Retention
from serving.jobs.store import QueueSnapshot
from serving.jobs.webhooks import WebhookSender
from serving.jobs.writer import FencedWriter
from serving.protocol import Fence, JobStatus, JobTicket
from serving.tenancy.fair_share import TenantState, claim_order

__all__ = ["JobRunner", "ClaimedJob"]

logger = logging.getLogger("ray.serve.reelserve.runner")

_RETRY_WRITE_S = 1.0  # how often a last write waits for an unreachable store
_FINISH_GRACE_S = 120.0  # how long a finished job's last write waits for the store
_HANDOVER_CHECKPOINT_S = 15.0  # how long a hand-over waits for diffusion's stop checkpoint (about a step at real size)
_READY_WAIT_S = 2.0  # how long one readiness check waits for a stage's answer
_WEBHOOKS_EVERY_S = 5.0  # how often callbacks left undelivered (a crashed runner's) are looked for


@dataclass
class ClaimedJob:
    """One job this replica runs: its record at claim time, its fence, its writer and its pipeline's context."""

    record: JobRecord
    fence: Fence
    writer: FencedWriter
    context: RunnerJobContext | None = None

    @property
    def id(self) -> str:
        return self.record.id


class JobRunner:
    def __init__(
        self,
        services: RunnerServices,
        model: ModelConfig,
        jobs: JobsConfig,
        settings: OrchestratorConfig,
        frame_rule: tuple[int, int],
        owner: str | None = None,
    ):
        """``frame_rule``: (step, offset) of the family's generated frame counts, for each job's plan."""
        self.services = services
        self.store = services.store
        self.storage = services.storage
        self.retention = Retention(services.store, services.storage, jobs)
        self.model = model
        self.jobs = jobs
        self.settings = settings
        self.frame_rule = frame_rule
        self.stats = services.stats
        self.owner = owner or "orchestrator-" + secrets.token_hex(6)  # what the store records as the job's owner
        self._running: dict[str, asyncio.Task] = {}
        self._claiming: set[str] = set()  # spawned, not yet claimed: counted as running until the store says so
        self._stages_ready = False
        self.webhooks = WebhookSender(services, self.owner)
        self._poller: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._store_failed_at = -math.inf  # monotonic time of the last store call that found the store down

    @staticmethod
    def io_pool() -> ThreadPoolExecutor:
        """Store calls block; they get their own threads so a slow store never stalls the event loop."""
        return ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def wake(self) -> None:
        """Look for claimable jobs now (the ingress calls this after accepting one)."""
        self._wake.set()

    async def stop(self) -> None:
        """Hand every job back (leases released, artifacts kept) and stop: a successor resumes them at once."""
        self._stopping = True
        tasks = list(self._running.values()) + ([self._poller] if self._poller else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.webhooks.stop()
        await self.services.events.close()

    @property
    def healthy(self) -> bool:
        """False when the loop that claims jobs has died (the replica then asks Serve to replace it)."""
        return self._poller is None or not self._poller.done() or self._stopping

    async def _io(self, method, *args, **kwargs):
        try:
            return await self.services.io(method, *args, **kwargs)
        except StoreUnavailable:
            self._store_failed_at = time.monotonic()
            raise

    def _orphan_grace_s(self) -> float:
        """How long past its lease a job waits before this replica takes it from its owner.

        One more lease normally; while the store is down and for one lease after it answers again, for ever
        (only unowned jobs are claimed), because every owner's renewals were failing too.
        """
        if time.monotonic() - self._store_failed_at < self.jobs.lease_s:
            return math.inf
        return self.jobs.lease_s

    async def _poll_forever(self) -> None:
        settings = self.settings
        sweep_every = self.storage.config.sweep_interval_s
        next_sweep = time.monotonic() + sweep_every
        next_webhooks = time.monotonic()
        self._rules_task = asyncio.ensure_future(self._install_lifecycle_rules())  # in the background: claims first
        while True:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + sweep_every
                await self._sweep()
            waiting = 0
            try:
                if not self._stages_ready:
                    self._stages_ready = await self._stages_answer()
                snapshot = await self._io(self.store.queue_snapshot, self._orphan_grace_s())
                await self._expire(snapshot.expired)
                waiting = await self._claim_what_can_run(snapshot)
                if time.monotonic() >= next_webhooks:
                    next_webhooks = time.monotonic() + _WEBHOOKS_EVERY_S
                    self.webhooks.deliver_pending(await self._io(self.store.webhooks_pending))
            except Exception as error:  # noqa: BLE001 - the store may be briefly unreachable
                logger.info("looking for jobs failed: %r", error)
            # What this replica runs, and what it saw waiting for a slot.
            metrics.jobs_active(self.model.name, queued=waiting, in_progress=len(self._running))
            await wait_for_event(self._wake, settings.poll_interval_s)
            self._wake.clear()

    async def _stages_answer(self) -> bool:
        """Every stage of this cluster answers (its replicas loaded and warmed up): only then are jobs claimed, so a
        fresh cluster in a rollout takes no job before its models have loaded."""
        calls = [handle.ready.remote() for name, handle in self.services.handles.items() if name != "prompt_rewriter"]
        try:
            await asyncio.wait_for(asyncio.gather(*(_result_of(call) for call in calls)), timeout=_READY_WAIT_S)
        except Exception:  # noqa: BLE001 - not yet (loading, or no replica yet): the next poll asks again
            for call in calls:
                call.cancel()
            return False
        logger.info("every stage answers; claiming jobs")
        return True

    async def _expire(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            record = await self._io(self.store.expire, job_id)
            if record is not None:
                logger.info("job %s expired after %g s in the queue", job_id, record.max_queue_wait_s)
                metrics.job_finished(self.model.name, "expired", "queue_timeout",
                                     max(0.0, time.time() - record.created_at), record.tenant)
                self.webhooks.deliver_pending([job_id])

    async def _claim_what_can_run(self, snapshot: QueueSnapshot) -> int:
        """Take orphaned jobs, then queued ones in fair-share order while diffusion has free slots; how many of
        the queued ones still wait."""
        room = self.settings.max_jobs - len(self._running)
        for job_id in snapshot.orphaned:
            if job_id not in self._running and room > 0:
                self._spawn(job_id)
                room -= 1
        if not self._stages_ready or not snapshot.queued:
            return len(snapshot.queued)
        free = await self._free_slots(snapshot)
        order = claim_order(snapshot.queued, self._tenant_states(snapshot))
        started = 0
        for job in order:
            if started >= min(free, room):
                break
            if job.job_id not in self._running:
                self._spawn(job.job_id)
                started += 1
        return len(snapshot.queued) - started

    async def _free_slots(self, snapshot: QueueSnapshot) -> int:
        replicas = await self._io(self.store.live_replicas, "diffusion")
        slots = len(replicas) * self.services.diffusion_slots
        # Spawned here and still queued in the snapshot: their claim is under way, their slot taken.
        claiming = len(self._claiming & {job.job_id for job in snapshot.queued})
        return max(0, slots - snapshot.running - claiming)

    def _tenant_states(self, snapshot: QueueSnapshot) -> dict[str, TenantState]:
        states = {}
        for name in {job.tenant for job in snapshot.queued} | set(snapshot.tenants):
            config = self.services.tenants.get(name)
            load = snapshot.tenants.get(name)
            states[name] = TenantState(
                share=config.share if config else 1.0,
                running=load.running if load else 0,
                last_started_at=load.last_started_at if load else None,
                max_concurrent=config.max_concurrent_jobs if config else None,
            )
        return states

    async def _sweep(self) -> None:
        """Remove what ended, expired, deleted or superseded jobs left (``serving.jobs.retention``)."""
        try:
            await self.services.io(self.retention.sweep)
        except Exception as error:  # noqa: BLE001 - the next sweep tries again
            logger.info("sweeping stored objects failed: %r", error)

    async def _install_lifecycle_rules(self) -> None:
        try:
            await self.services.io(self.retention.install_rules)
        except Exception as error:  # noqa: BLE001 - the sweeps expire objects without them
            logger.warning("installing the object store's lifecycle rules failed: %r", error)

    def _spawn(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self._running[job_id] = task
        self._claiming.add(job_id)
        task.add_done_callback(functools.partial(self._forget, job_id))

    def _forget(self, job_id: str, _task: asyncio.Task) -> None:
        self._running.pop(job_id, None)
        self._claiming.discard(job_id)

    # ------------------------------------------------------------------ one job

    async def _run(self, job_id: str) -> None:
        claim = asyncio.ensure_future(
            self._io(self.store.claim, job_id, self.owner, self.jobs.lease_s, self._orphan_grace_s())
        )
        try:
            record = await asyncio.shield(claim)  # a claim that lands must be known, even when stopping
            self._claiming.discard(job_id)
        except asyncio.CancelledError:
            record = await claim
            if record is not None:
                await self._io(self.store.release, Fence(job_id, self.owner, record.attempts))
            raise
        except StoreUnavailable:
            return
        if record is None:
            return  # another runner has it
        fence = Fence(job_id, self.owner, record.attempts)
        this_task = asyncio.current_task()
        assert this_task is not None  # _run runs as a task (_spawn)
        writer = FencedWriter(self.store, fence, self._io, on_lost=this_task.cancel, lease_s=self.jobs.lease_s)
        job = ClaimedJob(record=record, fence=fence, writer=writer)
        writer.start()
        try:
            await self._drive(job)
        except asyncio.CancelledError:
            if self._stopping and not writer.lost:
                await asyncio.shield(self._hand_over(job))
            elif writer.lost:
                logger.info("job %s: another runner took it over; stopping this attempt", job_id)
            else:
                raise
        except LeaseLost:
            logger.info("job %s: another runner took it over; stopping this attempt", job_id)
        finally:
            await writer.stop()
            await asyncio.shield(self._clean_up(job_id, fence.attempt))

    async def _drive(self, job: ClaimedJob) -> None:
        record = job.record
        if record.cancel_requested:
            return await self._finish(job, JobStatus.CANCELLED)
        if record.takeovers >= self.jobs.max_attempts:
            return await self._fail(
                job, "retries_exhausted", f"the job was interrupted {record.takeovers} times by failures; giving up"
            )
        try:
            now = await self._io(self.store.now)
        except StoreUnavailable:
            return await self._hand_over(job)  # try again when the store answers; nothing has started
        deadline = record.deadline_at or now + self.jobs.job_timeout_s
        if record.started_at is None:
            job.writer.note(status=JobStatus.IN_PROGRESS, started_at=now, deadline_at=deadline)
            metrics.first_progress(self.model.name, max(0.0, time.time() - record.created_at))
        if now >= deadline:
            return await self._fail(job, "deadline_exceeded", self._deadline_message())
        spec = job_spec(record, record.num_inference_steps or self.model.num_inference_steps, self.frame_rule)
        ticket = JobTicket(record.id, job.fence.owner, job.fence.attempt, record.prompt)
        job.context = RunnerJobContext(self.services, record, spec, ticket, job.writer)
        pipeline = self.services.family.pipeline
        try:
            video = await asyncio.wait_for(pipeline(job.context, spec, self.model), timeout=deadline - now)
        except asyncio.TimeoutError:
            return await self._fail(job, "deadline_exceeded", self._deadline_message())
        except JobCancelled:
            return await self._finish(job, JobStatus.CANCELLED)
        except StageFailure as failure:
            logger.warning("job %s failed in %s: %r", job.id, failure.stage, failure.error)
            code, message = client_safe_error(failure.error, failure.stage, _size_text(record))
            return await self._fail(job, code, message)
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as error:  # noqa: BLE001 - a bug here must end the job, not strand it on its lease
            logger.exception("job %s: the runner failed", job.id)
            return await self._fail(job, "internal", f"the orchestrator failed ({type(error).__name__}); retry")
        # The MP4 exists: its record is written outside the deadline, which no longer matters.
        await self._finish(job, JobStatus.COMPLETED, progress=100, stage_seconds=dict(job.context.timings),
                           **video.record_changes())

    def _deadline_message(self) -> str:
        return f"the job did not finish within {self.jobs.job_timeout_s:g} s of its start (jobs.job_timeout_s)"

    # ------------------------------------------------------------------ the last writes

    async def _finish(self, job: ClaimedJob, status: JobStatus, **changes: Any) -> None:
        """The job's last write: everything still queued, plus the outcome; it waits out a store outage."""
        pending = await job.writer.stop()  # a renewal landing after the outcome would be refused and cancel this
        outcome = {**pending, **changes, "status": status, "stage": status.api_name}
        outcome["completed_at"] = await self._retrying(self.store.now)
        outcome["expires_at"] = outcome["completed_at"] + self.storage.config.results_ttl_s
        if status == JobStatus.COMPLETED:
            outcome["progress"] = 100
            outcome["result_attempt"] = job.fence.attempt  # the muxer wrote under this attempt's key
        written = await self._retrying(self.store.finish, job.fence, **outcome)
        if not written:
            raise LeaseLost(job.id)
        metrics.job_finished(self.model.name, status.api_name, outcome.get("error_code"),
                             max(0.0, time.time() - job.record.created_at), job.record.tenant)
        if job.record.callback_url:
            self.webhooks.deliver_pending([job.id])
        accepted = job.fence.attempt if status == JobStatus.COMPLETED else None
        with contextlib.suppress(Exception):  # what is left, the sweeps remove
            await self.services.io(self.storage.remove_outputs, job.id, accepted, self.jobs.keep_artifacts)

    async def _fail(self, job: ClaimedJob, code: str, message: str) -> None:
        self.stats.bump(f"failures_{code}_total")
        await self._finish(job, JobStatus.FAILED, error_code=code, error_message=message)

    async def _retrying(self, method, *args, **kwargs):
        deadline = time.monotonic() + _FINISH_GRACE_S
        while True:
            try:
                return await self._io(method, *args, **kwargs)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(_RETRY_WRITE_S)

    async def _hand_over(self, job: ClaimedJob) -> None:
        """On shutdown: queued writes, diffusion's stop checkpoint, then the lease back.

        The lease is released only once the checkpoint of the step the denoising stopped at is kept (or a
        bound passed): a successor that starts earlier would resume from an older one and redo steps.
        """
        pending = await job.writer.stop()
        with contextlib.suppress(Exception):
            if pending:
                await self._io(self.store.update, job.fence, **pending)
            if job.context is not None and job.context.denoising:
                await self._await_stop_checkpoint(job)
            await self._io(self.store.release, job.fence)
            logger.info("job %s handed over", job.id)

    async def _await_stop_checkpoint(self, job: ClaimedJob) -> None:
        deadline = time.monotonic() + _HANDOVER_CHECKPOINT_S
        while time.monotonic() < deadline:
            record = await self._io(self.store.get, job.id)
            step = await self.services.io(self.storage.newest_checkpoint_step, job.id, job.fence.attempt)
            if record is None or (step is not None and step >= record.step):
                return
            await asyncio.sleep(0.2)
        logger.info("job %s: no checkpoint of its last step in %g s; handing it over anyway", job.id,
                    _HANDOVER_CHECKPOINT_S)

    async def _clean_up(self, job_id: str, attempt: int) -> None:
        """After an attempt: a deleted job goes entirely (its files never come back); a replaced attempt whose MP4
        is not the result takes it back."""
        try:
            final = await self._io(self.store.get, job_id)
            if final is None or (final.delete_requested and final.status.is_terminal):
                if final is not None:
                    await self._io(self.store.delete, job_id)
                await self.services.io(self.storage.remove_job, job_id)
            elif final.result_attempt != attempt and (final.status.is_terminal or final.attempts != attempt):
                # Its stage outputs and checkpoints stay: a successor resumes from them (they go when the job ends).
                await self.services.io(self.storage.remove_result, job_id, attempt)
        except Exception as error:  # noqa: BLE001 - the ingress deletes terminal jobs itself, and the sweeps
            logger.info("cleaning up after job %s failed: %r", job_id, error)


def _size_text(record: JobRecord) -> str:
    return f"{record.width}x{record.height}, {record.seconds:g} s at {record.fps} fps"


async def _result_of(response):
    return await response
