"""Drives accepted jobs through the stage graph: the heart of the orchestrator deployment.

Durability, in order of what can go wrong:

- **Pull, don't push.** Orchestrator replicas pull queued and orphaned jobs
  from the store (``claimable``) under leases; adding, removing or
  redeploying any replica never loses a job. On shutdown a replica hands its
  jobs back (``release``): the next claim takes them at once.
- **Fenced.** Every write about a job carries the claim's fence; a write from
  a replaced owner is refused, and the refusal stops that owner's work.
- **Nothing redone.** Stage outputs are kept in the job's artifacts until the
  job ends (``done_stages`` lists them), so a takeover skips finished stages
  and diffusion resumes from its last checkpoint.
- **Truthful.** Each stage call's result is awaited on its own (small
  hand-off receipts, never the tensors), so a failure names its stage. Cancel
  is honoured at every stage boundary and cancels the calls in flight. The
  deadline counts from the job's first start across attempts.
- **Store outages.** Progress and bookkeeping writes are queued and written
  when the store answers again; the job keeps running meanwhile. Every lease
  lapses during a long outage, so for one lease after the store answers
  again a replica claims only jobs nobody owns: the owners renew first, and
  an outage is not taken for a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.config import JobsConfig, ModelConfig, OrchestratorConfig, RewriterConfig
from serving import metrics
from serving.errors import JobCancelled, ReelserveError, StageOutOfMemory, StoreUnavailable
from serving.jobs.artifacts import ArtifactStore
from serving.jobs.events import JobEvents, wait_for_event
from serving.jobs.progress import STAGE_PROGRESS
from serving.jobs.record import JobRecord
from serving.jobs.results import ResultStore
from serving.jobs.store import Fence, JobStore
from serving.metrics import StageStats
from serving.protocol import Handoff, JobStatus, JobTicket, RenderPlan

__all__ = ["Orchestrator", "StageHandles", "StageFailure", "client_safe_error"]

logger = logging.getLogger("ray.serve.reelserve.orchestrator")

_RETRY_WRITE_S = 1.0  # how often a write waits for an unreachable store
_CANCEL_CHECK_S = 2.0  # the longest a stage call runs on unnoticed after a cancel (events usually tell at once)
_FINISH_GRACE_S = 120.0  # how long a finished job's last write waits for the store
_HANDOVER_CHECKPOINT_S = 15.0  # how long a hand-over waits for diffusion's stop checkpoint (about a step at real size)
_SWEEP_EVERY_S = 300.0  # how often kept outputs of ended jobs are looked for (a crash can leave them behind)


@dataclass
class StageHandles:
    """Deployment handles of the stages, in request order."""

    text_encoder: Any
    image_conditioner: Any
    diffusion: Any
    video_decoder: Any
    audio_decoder: Any
    muxer: Any
    prompt_rewriter: Any = None  # only when the rewriter is deployed


class LeaseLost(Exception):
    """Another orchestrator owns the job now; this one stops without writing."""


class StageFailure(Exception):
    """A stage failed for this job; ``stage`` names it."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error!r}")
        self.stage = stage
        self.error = error


@dataclass
class _Job:
    """One job this replica runs: its record at claim time, its fence, and writes waiting for the store."""

    record: JobRecord
    fence: Fence
    pending: dict = field(default_factory=dict)
    flush: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False
    writer: asyncio.Task | None = None  # renews the lease and sends queued writes
    denoising: bool = False  # a diffusion call is in flight (a hand-over waits for its stop checkpoint)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def ticket(self) -> JobTicket:
        return JobTicket(self.id, self.fence.owner, self.fence.attempt, self.record.prompt)


class Orchestrator:
    def __init__(
        self,
        store: JobStore,
        results: ResultStore,
        artifacts: ArtifactStore,
        stages: StageHandles,
        model: ModelConfig,
        jobs: JobsConfig,
        rewriter: RewriterConfig,
        settings: OrchestratorConfig,
        temporal_compression: int,
        prompt_fits: Callable[[str], bool] = lambda text: True,
        owner: str | None = None,
        condition_size: Callable[[RenderPlan], tuple[int, int]] | None = None,
    ):
        self.store = store
        self.results = results
        self.artifacts = artifacts
        self.stages = stages
        self.model = model
        self.jobs = jobs
        self.rewriter = rewriter
        self.settings = settings
        self.temporal_compression = temporal_compression
        self.prompt_fits = prompt_fits  # does a rewritten prompt fit the video model's text encoder?
        self.condition_size = condition_size or (lambda plan: (plan.width, plan.height))
        self.stats = StageStats(stage="orchestrator")
        self.owner = owner or "orchestrator-" + secrets.token_hex(6)  # what the store records as the job's owner
        self.events = JobEvents(store)
        # Store calls block; they get their own threads so a slow store never stalls the event loop.
        self._io_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")
        self._running: dict[str, asyncio.Task] = {}
        self._poller: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._store_failed_at = -math.inf  # monotonic time of the last store call that found the store down

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
        await self.events.close()
        self._io_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """False when the loop that claims jobs has died (the replica then asks Serve to replace it)."""
        return self._poller is None or not self._poller.done() or self._stopping

    async def _io(self, method, *args, **kwargs):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._io_pool, lambda: method(*args, **kwargs))
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
        orchestrator = self.settings
        next_sweep = time.monotonic() + _SWEEP_EVERY_S
        while True:
            room = orchestrator.max_jobs - len(self._running)
            waiting = 0
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + _SWEEP_EVERY_S
                await self._sweep_artifacts()
            try:
                claimable = await self._io(
                    self.store.claimable, self._orphan_grace_s(), max(room, 1) + len(self._running)
                )
                for job_id in claimable:
                    if job_id in self._running:
                        continue
                    if len(self._running) < orchestrator.max_jobs:
                        self._spawn(job_id)
                    else:
                        waiting += 1
            except Exception as error:  # noqa: BLE001 - the store may be briefly unreachable
                logger.info("looking for jobs failed: %r", error)
            # What this replica runs, and what it saw waiting for room (only when it is full).
            metrics.jobs_active(self.model.name, queued=waiting, in_progress=len(self._running))
            await wait_for_event(self._wake, orchestrator.poll_interval_s)
            self._wake.clear()

    async def _sweep_artifacts(self) -> None:
        """Forget the kept outputs of jobs that ended or no longer exist (left by a crash or a late checkpoint)."""
        if self.jobs.keep_artifacts:
            return
        try:
            for job_id in await self._io(self.artifacts.job_ids):
                record = await self._io(self.store.get, job_id)
                if record is None or record.status.is_terminal:
                    await self._io(self.artifacts.delete_job, job_id)
        except Exception as error:  # noqa: BLE001 - the next sweep tries again
            logger.info("sweeping kept outputs failed: %r", error)

    def _spawn(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self._running[job_id] = task
        task.add_done_callback(lambda _: self._running.pop(job_id, None))

    # ------------------------------------------------------------------ one job

    async def _run(self, job_id: str) -> None:
        claim = asyncio.ensure_future(
            self._io(self.store.claim, job_id, self.owner, self.jobs.lease_s, self._orphan_grace_s())
        )
        try:
            record = await asyncio.shield(claim)  # a claim that lands must be known, even when stopping
        except asyncio.CancelledError:
            record = await claim
            if record is not None:
                await self._io(self.store.release, Fence(job_id, self.owner, record.attempts))
            raise
        except StoreUnavailable:
            return
        if record is None:
            return  # another orchestrator has it
        job = _Job(record=record, fence=Fence(job_id, self.owner, record.attempts))
        job.writer = asyncio.get_running_loop().create_task(self._keep_lease_and_write(job, asyncio.current_task()))
        try:
            await self._drive(job)
        except asyncio.CancelledError:
            if self._stopping and not job.lost:
                await asyncio.shield(self._hand_over(job))
            raise
        except LeaseLost:
            logger.info("job %s: another orchestrator took it over; stopping this attempt", job_id)
        finally:
            await self._stop_writer(job)
            await asyncio.shield(self._remove_if_deleted(job_id))

    async def _drive(self, job: _Job) -> None:
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
            self._note(job, status=JobStatus.IN_PROGRESS, started_at=now, deadline_at=deadline)
            metrics.first_progress(self.model.name, max(0.0, time.time() - record.created_at))
        if now >= deadline:
            return await self._fail(job, "deadline_exceeded", self._deadline_message())
        try:
            outcome = await asyncio.wait_for(self._execute(job), timeout=deadline - now)
        except asyncio.TimeoutError:
            return await self._fail(job, "deadline_exceeded", self._deadline_message())
        except JobCancelled:
            return await self._finish(job, JobStatus.CANCELLED)
        except StageFailure as failure:
            logger.warning("job %s failed in %s: %r", job.id, failure.stage, failure.error)
            code, message = client_safe_error(failure.error, failure.stage, self._size_text(record))
            return await self._fail(job, code, message)
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as error:  # noqa: BLE001 - a bug here must end the job, not strand it on its lease
            logger.exception("job %s: the orchestrator failed", job.id)
            return await self._fail(job, "internal", f"the orchestrator failed ({type(error).__name__}); retry")
        # The MP4 exists: its record is written outside the deadline, which no longer matters.
        await self._finish(job, JobStatus.COMPLETED, **outcome)

    def _deadline_message(self) -> str:
        return f"the job did not finish within {self.jobs.job_timeout_s:g} s of its start (jobs.job_timeout_s)"

    async def _execute(self, job: _Job) -> None:
        record, stages, ticket = job.record, self.stages, job.ticket
        plan = RenderPlan.build(
            width=record.width, height=record.height, fps=record.fps, seconds=record.seconds, seed=record.seed,
            num_inference_steps=self.model.num_inference_steps, temporal_compression=self.temporal_compression,
        )
        done = set(record.done_stages)
        timings: dict[str, float] = dict(record.stage_seconds)
        clock = time.perf_counter()

        def finished(stage: str, kept: bool = True) -> None:
            """The stage's output landed: time it (unless an earlier attempt did) and, if it is kept, skip it
            on a takeover."""
            nonlocal clock
            now = time.perf_counter()
            if stage not in done:
                timings[stage] = round(now - clock, 4)
                if kept:
                    done.add(stage)
                self._note(job, done_stages=sorted(done), stage_seconds=dict(timings))
            clock = now

        prompt = record.prompt
        if record.enhance_prompt:
            prompt = await self._rewritten_prompt(job)
            finished("prompt_rewriter")

        # Text and photo encode side by side; each result is checked as it lands.
        self._advance(job, "text_encoder")
        embeddings = self._kept(job, "text_encoder", "prompt_embeddings") or asyncio.ensure_future(
            self._call(job, "text_encoder", lambda: stages.text_encoder.encode.remote(ticket, prompt, record.negative_prompt))
        )
        condition = None
        if record.has_image:
            width, height = self.condition_size(plan)  # a recipe may start below the plan's size
            condition = self._kept(job, "image_conditioner", "image_condition") or asyncio.ensure_future(
                self._call(job, "image_conditioner",
                           lambda: stages.image_conditioner.condition.remote(ticket, width, height))
            )
        try:
            embeddings = await _settled(embeddings)
            finished("text_encoder", embeddings.kept)
            if condition is not None:
                self._advance(job, "image_conditioner")
                condition = await _settled(condition)
                finished("image_conditioner", condition.kept)
        finally:
            for pending in (embeddings, condition):
                if isinstance(pending, asyncio.Future) and not pending.done():
                    pending.cancel()

        self._advance(job, "diffusion")
        latents = self._kept_pair(job)
        if latents is None:
            job.denoising = True
            try:
                result = await self._call(
                    job, "diffusion", lambda: stages.diffusion.denoise.remote(ticket, embeddings, condition, plan)
                )
            finally:
                job.denoising = False
            latents = result.video, result.audio
            self._note(job, step=result.finished_steps, total_steps=result.total_steps)
            if result.resumed_from_step is not None:
                self._note(job, resumed_from_step=result.resumed_from_step)
            finished("diffusion", result.video.kept and result.audio.kept)
        else:
            finished("diffusion")
        embeddings = condition = None  # their consumer has them

        self._advance(job, "decoders")

        async def decoded(stage: str, name: str, make_call) -> Handoff:
            handoff = self._kept(job, stage, name) or await self._call(job, stage, make_call)
            finished(stage, handoff.kept)  # each decoder's output counts on its own
            return handoff

        video_latents, audio_latents = latents
        video, waveform = await _both(
            decoded("video_decoder", "encoded_video",
                    lambda: stages.video_decoder.decode.remote(ticket, video_latents, plan)),
            decoded("audio_decoder", "waveform", lambda: stages.audio_decoder.decode.remote(ticket, audio_latents)),
        )
        latents = video_latents = audio_latents = None

        self._advance(job, "muxer")
        muxed = await self._call(job, "muxer", lambda: stages.muxer.mux.remote(ticket, video, waveform))
        finished("muxer")
        return {"progress": 100, "result_path": muxed.path, "result_bytes": muxed.num_bytes, "stage_seconds": timings}

    def _kept(self, job: _Job, stage: str, name: str) -> Handoff | None:
        """A finished stage's output from an earlier attempt: the hand-off reads the kept copy."""
        return Handoff(job.id, name, ref=None, nbytes=0) if stage in job.record.done_stages else None

    def _kept_pair(self, job: _Job) -> tuple[Handoff, Handoff] | None:
        if "diffusion" not in job.record.done_stages:
            return None
        return Handoff(job.id, "video_latents", None, 0), Handoff(job.id, "audio_latents", None, 0)

    # ------------------------------------------------------------------ stage calls

    async def _call(self, job: _Job, stage: str, make_call: Callable[[], Any]) -> Any:
        """One stage call, cancelled with the job; retried when its replica died (diffusion then resumes)."""
        for retry in range(self.jobs.stage_retries + 1):
            await self._raise_if_cancelled(job)
            response = make_call()
            try:
                return await self._await_unless_cancelled(job, response)
            except (asyncio.CancelledError, JobCancelled):
                response.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - every failure is attributed to this stage
                if _replica_died(error) and retry < self.jobs.stage_retries:
                    logger.warning("job %s: a %s replica died mid-call; calling again (%d of %d)",
                                   job.id, stage, retry + 1, self.jobs.stage_retries)
                    self.stats.bump("stage_retries_total")
                    continue
                raise StageFailure(stage, error) from None

    async def _await_unless_cancelled(self, job: _Job, response) -> Any:
        call = asyncio.ensure_future(_result_of(response))
        try:
            while True:
                watch = asyncio.ensure_future(self.events.wait(job.id, _CANCEL_CHECK_S))
                done, _ = await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
                if call in done:
                    watch.cancel()
                    return call.result()
                await self._raise_if_cancelled(job)
        finally:
            if not call.done():
                call.cancel()

    async def _raise_if_cancelled(self, job: _Job) -> None:
        try:
            cancelled = await self._io(self.store.is_cancel_requested, job.id)
        except StoreUnavailable:
            return  # cannot tell now; the next check will
        if cancelled:
            raise JobCancelled(job.id)

    async def _rewritten_prompt(self, job: _Job) -> str:
        """The rewriter's prompt, or the user's when rewriting falls back (it never fails the job)."""
        record = job.record
        if record.revised_prompt or record.rewrite_fallback:  # decided by an earlier attempt
            return record.revised_prompt or record.prompt
        self._advance(job, "prompt_rewriter")
        response = None
        try:
            if self.stages.prompt_rewriter is None:  # e.g. a takeover after a redeploy without the rewriter
                raise LookupError("no prompt_rewriter stage deployed")
            photo = None
            if record.has_image and self.rewriter.multimodal:
                photo = await self._io(self.results.load_input, record.id)
            response = self.stages.prompt_rewriter.rewrite.remote(record.prompt, record.seed, photo)
            # The stage enforces the timeout itself; this bound covers an unreachable or queued stage.
            result = await asyncio.wait_for(_result_of(response), timeout=self.rewriter.timeout_s + 5)
            text, fallback = result.text, result.fallback
        except Exception:  # noqa: BLE001 - includes asyncio.TimeoutError
            if response is not None:
                response.cancel()
            text, fallback = None, "unavailable"
        if text is not None and not self.prompt_fits(text):
            text, fallback = None, "overlong"
        if fallback is not None:
            self.stats.bump(f"rewrite_fallbacks_{fallback}_total")
            if fallback in ("unavailable", "overlong"):  # the stage itself counts the others
                metrics.rewrite_fallback(self.model.name, fallback)
            logger.info("job %s: prompt rewrite fell back (%s); using the original prompt", record.id, fallback)
        self._note(job, revised_prompt=text, rewrite_fallback=fallback)
        return text or record.prompt

    # ------------------------------------------------------------------ writes

    def _advance(self, job: _Job, stage: str) -> None:
        self._note(job, stage=stage, progress=STAGE_PROGRESS[stage])
        metrics.job_progressed(self.model.name)

    def _note(self, job: _Job, **changes) -> None:
        """Queue a write about the job; the writer task sends it now, or when the store answers again."""
        job.pending.update(changes)
        job.flush.set()

    async def _keep_lease_and_write(self, job: _Job, runner: asyncio.Task) -> None:
        """Renew the lease and send queued writes; a refused write means the job is someone else's now."""
        renew_every = self.jobs.lease_s / 3
        next_renewal = 0.0
        while True:
            await wait_for_event(job.flush, next_renewal - time.monotonic())
            job.flush.clear()
            changes, job.pending = job.pending, {}
            try:
                ok = True
                if changes:
                    ok = await self._io(self.store.update, job.fence, **changes)
                if ok and time.monotonic() >= next_renewal:
                    ok = await self._io(self.store.renew, job.fence, self.jobs.lease_s)
                    next_renewal = time.monotonic() + renew_every
            except asyncio.CancelledError:
                job.pending = {**changes, **job.pending}  # stopped mid-write: the final write sends them
                raise
            except Exception as error:  # noqa: BLE001 - an outage, or anything else: keep them and try again
                if not isinstance(error, StoreUnavailable):
                    logger.warning("job %s: writing to the store failed: %r; retrying", job.id, error)
                job.pending = {**changes, **job.pending}  # keep them, newest last, for when the store is back
                await asyncio.sleep(_RETRY_WRITE_S)
                job.flush.set()
                continue
            if not ok:
                job.lost = True
                runner.cancel()
                return

    async def _stop_writer(self, job: _Job) -> None:
        if job.writer is not None:
            job.writer.cancel()
            with contextlib.suppress(BaseException):
                await job.writer

    async def _finish(self, job: _Job, status: JobStatus, **changes) -> None:
        """The job's last write: everything still queued, plus the outcome; it waits out a store outage."""
        await self._stop_writer(job)  # a renewal landing after the outcome would be refused and cancel this
        outcome = {**job.pending, **changes, "status": status, "stage": status.api_name}
        outcome["completed_at"] = await self._retrying(self.store.now)
        if status == JobStatus.COMPLETED:
            outcome["progress"] = 100
        written = await self._retrying(self.store.finish, job.fence, **outcome)
        if not written:
            raise LeaseLost(job.id)
        job.pending = {}
        metrics.job_finished(self.model.name, status.api_name, outcome.get("error_code"),
                             max(0.0, time.time() - job.record.created_at))
        if not self.jobs.keep_artifacts:
            with contextlib.suppress(Exception):
                await self._io(self.artifacts.delete_job, job.id)

    async def _fail(self, job: _Job, code: str, message: str) -> None:
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

    async def _hand_over(self, job: _Job) -> None:
        """On shutdown: queued writes, diffusion's stop checkpoint, then the lease back.

        The lease is released only once the checkpoint of the step the denoising stopped at is kept (or a
        bound passed): a successor that starts earlier would resume from an older one and redo steps.
        """
        await self._stop_writer(job)
        with contextlib.suppress(Exception):
            if job.pending:
                await self._io(self.store.update, job.fence, **job.pending)
            if job.denoising:
                await self._await_stop_checkpoint(job)
            await self._io(self.store.release, job.fence)
            logger.info("job %s handed over", job.id)

    async def _await_stop_checkpoint(self, job: _Job) -> None:
        deadline = time.monotonic() + _HANDOVER_CHECKPOINT_S
        while time.monotonic() < deadline:
            record = await self._io(self.store.get, job.id)
            checkpoint = await self._io(self.artifacts.get, job.id, "denoise_checkpoint")
            if record is None or (checkpoint is not None and checkpoint.finished_steps >= record.step):
                return
            await asyncio.sleep(0.2)
        logger.info("job %s: no checkpoint of its last step in %g s; handing it over anyway", job.id,
                    _HANDOVER_CHECKPOINT_S)

    async def _remove_if_deleted(self, job_id: str) -> None:
        try:
            final = await self._io(self.store.get, job_id)
            if final is not None and final.delete_requested and final.status.is_terminal:
                await self._io(self.store.delete, job_id)
                await self._io(self.results.remove, job_id)
                await self._io(self.artifacts.delete_job, job_id)
        except Exception as error:  # noqa: BLE001 - the ingress deletes terminal jobs itself too
            logger.info("removing deleted job %s failed: %r", job_id, error)

    @staticmethod
    def _size_text(record: JobRecord) -> str:
        return f"{record.width}x{record.height}, {record.seconds:g} s at {record.fps} fps"


async def _result_of(response):
    return await response


async def _settled(value):
    """A hand-off, awaiting it first if it is still being computed."""
    return await value if isinstance(value, asyncio.Future) else value


async def _both(first, second) -> tuple[Any, Any]:
    """Two stage calls side by side; when one fails, the other is cancelled and the failure kept."""
    tasks = [asyncio.ensure_future(_settled(v) if not asyncio.iscoroutine(v) else v) for v in (first, second)]
    try:
        return tuple(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


def _replica_died(error: BaseException) -> bool:
    names = {type(error).__name__, type(getattr(error, "cause", None) or error).__name__}
    return bool(names & {"ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError"})


def client_safe_error(error: BaseException, stage: str, size: str = "") -> tuple[str, str]:
    """An error code and a one-line message for the client: no tracebacks, paths or addresses.

    Only our own errors carry their text through; anything else is named by its type and the stage.
    """
    cause = getattr(error, "cause", None) or error
    name = type(cause).__name__
    at = f" at {size}" if size else ""
    if isinstance(cause, StageOutOfMemory) or "OutOfMemory" in name or "out of memory" in str(cause).lower():
        return "resource_exhausted", f"the {stage} stage ran out of memory{at}; try a smaller size or fewer seconds"
    if "BackPressure" in name:
        return "overloaded", f"the {stage} stage was full; retry later"
    if _replica_died(error):
        return "stage_unavailable", f"a {stage} replica died while generating this video, also when retried; retry later"
    if isinstance(cause, ReelserveError):
        return "generation_failed", f"the {stage} stage failed: " + cause.client_message.splitlines()[0][:300]
    return "generation_failed", f"the {stage} stage failed ({name})"
