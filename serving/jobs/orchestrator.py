"""Runs accepted jobs through the stage graph, one asyncio task per job.

Durability: the job store is the source of truth. An orchestrator owns a job
through a lease it renews; when its replica dies the lease lapses and another
orchestrator (or the restarted replica) takes the job over and runs it again.
Every job ends ``completed``, ``failed`` (with a message) or ``cancelled``.

Large tensors never come here: stage responses are chained by reference and
only the final, small MP4 receipt is fetched.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from cluster.config import JobsConfig
from serving.errors import JobCancelled, Overloaded, ReelserveError
from serving.jobs.progress import STAGE_PROGRESS
from serving.jobs.record import JobRecord, new_job_id
from serving.jobs.results import ResultStore
from serving.jobs.store import JobStore
from serving.metrics import StageStats
from serving.protocol import JobStatus, RenderPlan
from serving.requests import VideoRequest

__all__ = ["Orchestrator", "StageHandles", "client_safe_error"]

logger = logging.getLogger("reelserve.orchestrator")


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


class Orchestrator:
    def __init__(
        self,
        store: JobStore,
        results: ResultStore,
        stages: StageHandles,
        jobs: JobsConfig,
        temporal_compression: int,
        prompt_fits: Callable[[str], bool] = lambda text: True,
        rewrite_timeout_s: float = 5.0,
        rewriter_sees_photo: bool = False,
    ):
        self.store = store
        self.results = results
        self.stages = stages
        self.jobs = jobs
        self.temporal_compression = temporal_compression
        self.prompt_fits = prompt_fits  # does a rewritten prompt fit the video model's text encoder?
        self.rewrite_timeout_s = rewrite_timeout_s
        self.rewriter_sees_photo = rewriter_sees_photo  # only multimodal rewriters get the (large) photo bytes
        self.stats = StageStats(stage="orchestrator")
        self.owner = "orchestrator-" + secrets.token_hex(6)
        # Waiting for a stage without fetching its output blocks a thread; give those waits their own
        # pool sized for every active job (two waits each at most) so they never starve the event loop's.
        self._waiters = ThreadPoolExecutor(max_workers=2 * jobs.max_active_jobs + 2, thread_name_prefix="stage-wait")
        self._tasks: dict[str, asyncio.Task] = {}
        self._recovery: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin looking for jobs whose owner died (including this replica's previous life)."""
        if self._recovery is None:
            self._recovery = asyncio.get_running_loop().create_task(self._recover_forever())

    async def stop(self) -> None:
        tasks = list(self._tasks.values()) + ([self._recovery] if self._recovery else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._waiters.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ API

    def submit(self, request: VideoRequest) -> JobRecord:
        """Accept a validated request as a queued job, or refuse it when the system is full."""
        if self.store.count_active() >= self.jobs.max_active_jobs:
            raise Overloaded(
                f"the server is at its limit of {self.jobs.max_active_jobs} active jobs; retry later",
                retry_after_s=self.jobs.retry_after_s,
            )
        plan = request.plan
        record = JobRecord(
            id=new_job_id(), model=request.model, prompt=request.prompt, negative_prompt=request.negative_prompt,
            seconds=plan.seconds, width=plan.width, height=plan.height, fps=plan.fps, seed=plan.seed,
            has_image=request.image is not None, total_steps=plan.num_inference_steps,
            enhance_prompt=request.enhance_prompt,
        )
        if request.image is not None:
            self.results.save_input(record.id, request.image)
        self.store.create(record)
        self._spawn(record.id)
        return record

    def cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        record = self.store.request_cancel(job_id, delete=delete)
        if record is not None and record.status.is_terminal and delete:
            self._remove(job_id)
        return record

    # ------------------------------------------------------------------ running a job

    def _spawn(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        if not self.store.claim(job_id, self.owner, self.jobs.lease_s, time.time()):
            return  # another orchestrator has it
        record = self.store.get(job_id)
        if record is None:
            return
        heartbeat = asyncio.get_running_loop().create_task(self._renew_lease(job_id, asyncio.current_task()))
        try:
            if record.cancel_requested:
                raise JobCancelled(job_id)
            if record.attempts >= self.jobs.max_attempts:
                self._finish_failed(
                    job_id, "retries_exhausted", f"the job was interrupted {record.attempts} times; giving up"
                )
                return
            attempt = record.attempts + 1
            self.store.update(
                job_id, status=JobStatus.IN_PROGRESS, started_at=record.started_at or time.time(),
                attempts=attempt, stage="text_encoder", progress=max(record.progress, 1),
            )
            await asyncio.wait_for(self._execute(record, attempt), timeout=self.jobs.job_timeout_s)
        except asyncio.TimeoutError:
            self.store.request_cancel(job_id)  # stop the stages still working on it
            self._finish_failed(job_id, "timeout", f"the job ran longer than {self.jobs.job_timeout_s:g} s")
        except asyncio.CancelledError:
            raise  # this replica is shutting down or lost the lease: another orchestrator takes over
        except Exception as error:  # noqa: BLE001 - every failure must end the job
            if isinstance(error, JobCancelled) or self.store.is_cancel_requested(job_id):
                self.store.finish(job_id, status=JobStatus.CANCELLED, stage="cancelled", completed_at=time.time())
            else:
                logger.warning("job %s failed: %r", job_id, error)
                current = self.store.get(job_id)
                code, message = client_safe_error(error, current.stage if current else "unknown")
                self._finish_failed(job_id, code, message)
        finally:
            heartbeat.cancel()
            final = self.store.get(job_id)
            if final is not None and final.delete_requested and final.status.is_terminal:
                self._remove(job_id)

    async def _execute(self, record: JobRecord, attempt: int) -> None:
        job_id, stages = record.id, self.stages
        plan = RenderPlan.build(
            width=record.width, height=record.height, fps=record.fps, seconds=record.seconds, seed=record.seed,
            num_inference_steps=record.total_steps, temporal_compression=self.temporal_compression,
        )
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def mark(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round(now - clock, 4)
            clock = now

        prompt = record.prompt
        if record.enhance_prompt:
            prompt = await self._rewritten_prompt(record)
            mark("prompt_rewriter")
            self._advance(job_id, "text_encoder")
        embeddings = stages.text_encoder.encode.remote(prompt, record.negative_prompt)
        condition = None
        if record.has_image:
            photo = self.results.load_input(job_id)
            condition = stages.image_conditioner.condition.remote(photo, plan.width, plan.height)
        await self._done(embeddings)
        mark("text_encoder")
        if condition is not None:
            self._advance(job_id, "image_conditioner")
            await self._done(condition)
            mark("image_conditioner")
        self._raise_if_cancelled(job_id)

        self._advance(job_id, "diffusion")
        latents = stages.diffusion.denoise.remote(job_id, attempt, embeddings, condition, plan)
        await self._done(latents)
        mark("diffusion")
        self._raise_if_cancelled(job_id)

        self._advance(job_id, "decoders")
        frames = stages.video_decoder.decode.remote(latents, plan)
        waveform = stages.audio_decoder.decode.remote(latents)
        await asyncio.gather(self._done(frames), self._done(waveform))
        mark("decoders")

        self._advance(job_id, "muxer")
        video = await stages.muxer.mux.remote(job_id, frames, waveform)
        mark("muxer")
        self.store.finish(
            job_id, status=JobStatus.COMPLETED, stage="completed", progress=100, completed_at=time.time(),
            result_path=video.path, result_bytes=video.num_bytes, stage_seconds=timings,
        )

    async def _rewritten_prompt(self, record: JobRecord) -> str:
        """The rewriter's prompt, or the user's when rewriting falls back (it never fails the job)."""
        if record.revised_prompt:  # a takeover after the rewrite already happened
            return record.revised_prompt
        self._advance(record.id, "prompt_rewriter")
        response = None
        try:
            if self.stages.prompt_rewriter is None:  # e.g. a takeover after a redeploy without the rewriter
                raise LookupError("no prompt_rewriter stage deployed")
            photo = self.results.load_input(record.id) if record.has_image and self.rewriter_sees_photo else None
            response = self.stages.prompt_rewriter.rewrite.remote(record.prompt, record.seed, photo)
            # The stage enforces the timeout itself; this bound covers an unreachable or queued stage.
            result = await asyncio.wait_for(_result_of(response), timeout=self.rewrite_timeout_s + 5)
            text, fallback = result.text, result.fallback
        except Exception:  # noqa: BLE001 - includes asyncio.TimeoutError
            if response is not None:
                response.cancel()
            text, fallback = None, "unavailable"
        if text is not None and not self.prompt_fits(text):
            text, fallback = None, "overlong"
        if fallback is not None:
            self.stats.bump(f"rewrite_fallbacks_{fallback}_total")
            logger.info("job %s: prompt rewrite fell back (%s); using the original prompt", record.id, fallback)
        self.store.update(record.id, revised_prompt=text, rewrite_fallback=fallback)
        return text or record.prompt

    async def _done(self, response) -> None:
        """Wait until a stage response is computed, without fetching its value here."""
        import ray

        ref = await response._to_object_ref()
        await asyncio.get_running_loop().run_in_executor(self._waiters, lambda: ray.wait([ref], fetch_local=False))

    def _advance(self, job_id: str, stage: str) -> None:
        current = self.store.get(job_id)
        progress = max(STAGE_PROGRESS[stage], current.progress if current else 0)  # never backwards on a retry
        self.store.update(job_id, stage=stage, progress=progress)

    def _raise_if_cancelled(self, job_id: str) -> None:
        if self.store.is_cancel_requested(job_id):
            raise JobCancelled(job_id)

    def _finish_failed(self, job_id: str, code: str, message: str) -> None:
        self.store.finish(
            job_id, status=JobStatus.FAILED, stage="failed", completed_at=time.time(),
            error_code=code, error_message=message,
        )

    def _remove(self, job_id: str) -> None:
        self.store.delete(job_id)
        self.results.remove(job_id)

    async def _renew_lease(self, job_id: str, runner: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(self.jobs.lease_s / 3)
            try:
                renewed = self.store.claim(job_id, self.owner, self.jobs.lease_s, time.time())
                record = None if renewed else self.store.get(job_id)
            except Exception as error:  # noqa: BLE001 - a store hiccup must not end the heartbeat
                logger.warning("renewing the lease of job %s failed: %r; retrying", job_id, error)
                continue
            if not renewed:
                if record is None or not record.status.is_terminal:
                    runner.cancel()  # someone else owns it now; stop duplicating work
                return

    async def _recover_forever(self) -> None:
        while True:
            try:
                for job_id in self.store.orphans(time.time()):
                    self._spawn(job_id)
            except Exception as error:  # noqa: BLE001 - the store may be briefly unreachable
                logger.warning("job recovery scan failed: %r", error)
            await asyncio.sleep(self.jobs.recovery_interval_s)


async def _result_of(response):
    return await response


def client_safe_error(error: BaseException, stage: str) -> tuple[str, str]:
    """An error code and a one-line message for the client: no tracebacks, paths or addresses.

    Only our own errors carry their text through; anything else is named by its type and the stage.
    """
    cause = getattr(error, "cause", None) or error
    name = type(cause).__name__
    if "OutOfMemory" in name or "out of memory" in str(cause).lower():
        return "out_of_memory", f"the {stage} stage ran out of memory; try a smaller size or fewer seconds"
    if "BackPressure" in name:
        return "overloaded", f"the {stage} stage was full; retry later"
    if "ActorDied" in name or "ActorUnavailable" in name or "WorkerCrashed" in name:
        return "stage_unavailable", f"a {stage} replica died while generating this video; retry"
    if isinstance(cause, ReelserveError):
        return "generation_failed", cause.client_message.splitlines()[0][:300]
    return "generation_failed", f"the {stage} stage failed ({name})"
