"""What both ingresses do, once: validate, record, look up, cancel, watch, read results.

The ingress is stateless: it records accepted jobs in the store and wakes an
orchestrator; it never runs a job, so redeploying or scaling it loses
nothing. Everything that blocks (store calls, photo decoding, tokenizing)
runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from cluster.admission import AdmissionLimits, JobLoad, StepRate, admit, backlog_token_steps
from cluster.config import JobsConfig, ModelConfig, RewriterConfig, StorageConfig
from serving import metrics
from serving.errors import InvalidRequest, NotFound, Overloaded
from serving.families import get_family
from serving.ingress.downloads import StoredVideoFile, VideoDownloads
from serving.jobs.events import JobEvents
from serving.jobs.job_storage import JobStorage
from serving.jobs.record import PHOTO_INPUT, JobRecord, new_job_id
from serving.jobs.store import open_store
from serving.protocol import JobStatus
from serving.requests import VideoRequest, validate_request
from serving.storage.keys import check_job_id

__all__ = ["VideoService", "CHUNK_BYTES"]

CHUNK_BYTES = 1024 * 1024  # gRPC clients receive at most 4 MiB per message
_WATCH_WAIT_S = 5.0  # a watcher re-reads at least this often even if no notification arrives
_BACKLOG_FRESH_S = 1.0  # admission re-reads the backlog at most this often
_STORAGE_FRESH_S = 1.0  # a job without a photo checks that storage answers at most this often
MAX_PAGE = 100


class VideoService:
    def __init__(
        self, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig, orchestrator=None,
        limits: AdmissionLimits | None = None, storage: StorageConfig | None = None,
    ):
        self.model, self.jobs, self.rewriter = model, jobs, rewriter
        self.admission = limits
        self._step_rate = StepRate(limits.seconds_per_token_step if limits else model.seconds_per_token_step)
        self._rated: set[str] = set()
        self._backlog: tuple[float, int] = (0.0, 0)  # (when read, latent token-steps)
        family = get_family(model.family)
        self.limits = family.read_limits(model)
        self._count_tokens = family.token_counter(model)
        self.store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)
        # Fail fast: a client waits about two seconds at most for a 503 when storage is down.
        self.storage = JobStorage(storage or StorageConfig().with_job_defaults(jobs.results_dir, jobs.artifacts),
                                  jobs.redis_url, fail_fast=True)
        self.downloads = VideoDownloads(self.storage, CHUNK_BYTES)
        self._storage_answered_at = -1e9
        self.events = JobEvents(self.store)
        self._orchestrator = orchestrator  # a deployment handle: woken after each accepted job
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ingress-io")

    async def _blocking(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: function(*args, **kwargs))

    async def close(self) -> None:
        await self.events.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ jobs

    async def create(self, field_names: dict[str, str] | None = None, **fields) -> JobRecord:
        request = await self._blocking(self._validate, field_names, fields)
        jobs = self.jobs
        await self._admit_by_capacity()
        record = _new_record(request)
        if request.image is not None:
            await self._blocking(self.storage.save_input, record.id, PHOTO_INPUT.name, request.image)
        else:
            await self._storage_answers()  # the job's video goes there: no job while it is down
        try:
            created = await self._blocking(self.store.create, record, max_active=jobs.max_active_jobs)
        except BaseException:
            await self._forget_inputs(record)  # no job, no photo left behind
            raise
        if not created:
            await self._forget_inputs(record)
            metrics.admission_refused(self.model.name, "max_active_jobs")
            raise Overloaded(
                f"the server is at its limit of {jobs.max_active_jobs} active jobs; retry later",
                retry_after_s=jobs.retry_after_s,
            )
        if self._orchestrator is not None:
            self._orchestrator.wake.remote()  # not awaited: orchestrators also poll
        return record

    async def _storage_answers(self) -> None:
        """``StorageUnavailable`` (503) when the results store does not answer (asked at most once a second)."""
        now = asyncio.get_running_loop().time()
        if now - self._storage_answered_at > _STORAGE_FRESH_S:
            await self._blocking(self.storage.probe)
            self._storage_answered_at = now

    async def _forget_inputs(self, record: JobRecord) -> None:
        if record.has_image:
            with contextlib.suppress(Exception):  # what is left without a record, the sweeps remove
                await self._blocking(self.storage.remove_job, record.id)

    async def _admit_by_capacity(self) -> None:
        """Refuse a job that would wait longer than scaling.max_queue_wait_s even with diffusion at max replicas."""
        limits = self.admission
        if limits is None or limits.max_queue_wait_s is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._backlog[0] > _BACKLOG_FRESH_S:
            self._backlog = (now, await self._blocking(self._read_backlog))
        answer = admit(self._backlog[1], self._step_rate.value, limits.diffusion_replicas, limits.max_queue_wait_s,
                       min_retry_after_s=limits.retry_after_s)
        if not answer.admitted:
            metrics.admission_refused(self.model.name, "queue_wait")
            raise Overloaded(answer.reason, retry_after_s=answer.retry_after_s)

    def _read_backlog(self) -> int:
        """Token-steps still to denoise over the active jobs; the newest finished jobs refine the step rate."""
        recent, _ = self.store.list(after=None, limit=20, order="desc")
        for record in recent:
            seconds = record.stage_seconds.get("diffusion")
            whole = record.attempts == 1 and record.resumed_from_step is None  # one uninterrupted denoising
            if record.status == JobStatus.COMPLETED and seconds and whole and record.id not in self._rated:
                self._rated.add(record.id)
                load = JobLoad.of(self.model, record.width, record.height, record.seconds, record.fps, record.total_steps)
                self._step_rate.observe(load.tokens, record.total_steps, seconds)
        if len(self._rated) > 1000:
            self._rated = {r.id for r in recent}
        steps = self.model.num_inference_steps
        return backlog_token_steps(
            JobLoad.of(self.model, r.width, r.height, r.seconds, r.fps, max(r.total_steps, steps), r.step)
            for r in self.store.active_records()
        )

    def _validate(self, field_names, fields) -> VideoRequest:
        return validate_request(
            config=self.model, limits=self.limits, count_tokens=self._count_tokens,
            enhance_default=self.rewriter.enhance_by_default, rewriter_available=bool(self.rewriter.enabled),
            field_names=field_names, **fields,
        )

    async def get(self, job_id: str) -> JobRecord:
        """The job; ``NotFound`` for an id of no job's shape, before any store is asked."""
        try:
            check_job_id(job_id)
        except ValueError:
            raise NotFound(f"no video with id {job_id!r}") from None
        record = await self._blocking(self.store.get, job_id)
        if record is None or record.delete_requested:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    async def list(self, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        if order not in ("asc", "desc"):
            raise InvalidRequest("order", f"'{order}' is not allowed; use asc or desc")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest("limit", f"{limit} is out of range; allowed: 1 to {MAX_PAGE}")
        if after:
            await self.get(after)  # an unknown cursor is an error, not an empty page
        records, has_more = await self._blocking(self.store.list, after=after or None, limit=limit, order=order)
        return [r for r in records if not r.delete_requested], has_more

    async def cancel(self, job_id: str) -> JobRecord:
        """Stop the job: at once if nobody claimed it yet, else its orchestrator stops it within one denoising step."""
        await self.get(job_id)
        record = await self._blocking(self.store.request_cancel, job_id)
        if record is None:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    async def delete(self, job_id: str) -> None:
        await self.get(job_id)
        # The flag and the job's state in one write: a job that ended meanwhile (or was still queued and ended
        # by this very write) is removed here; a running one is removed by its orchestrator once it stopped.
        record = await self._blocking(self.store.request_cancel, job_id, delete=True)
        if record is not None and record.status.is_terminal:
            await self._blocking(self._remove, job_id)

    def _remove(self, job_id: str) -> None:
        self.storage.remove_job(job_id)  # first: with storage down the client gets a 503 and the record stays
        self.store.delete(job_id)

    async def content(self, job_id: str, sign: bool) -> StoredVideoFile:
        """Where the finished MP4 is: a signed URL (``sign`` and an object store that signs) or something to stream."""
        return await self.downloads.locate(await self.get(job_id), sign=sign)

    async def download_url(self, record: JobRecord) -> str:
        """A signed URL of the job's MP4 when downloads are redirects and it is completed, else ``""``."""
        return await self.downloads.signed_url(record)

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job each time its progress rises, then once more when it ends (woken by store writes)."""
        record = await self.get(job_id)
        last_progress = -1
        while True:
            if record.progress > last_progress or record.status.is_terminal:
                last_progress = record.progress
                yield record
            if record.status.is_terminal:
                return
            await self.events.wait(job_id, _WATCH_WAIT_S)
            record = await self._reread(job_id, record)

    async def _reread(self, job_id: str, last: JobRecord) -> JobRecord:
        """The job again; while the store is unreachable the watcher keeps what it had and waits."""
        from serving.errors import StoreUnavailable

        try:
            return await self.get(job_id)
        except StoreUnavailable:
            return last

    async def read_chunks(self, job_id: str):
        """``(offset, data, total)`` chunks of the finished MP4."""
        video = await self.content(job_id, sign=False)
        offset = 0
        async for chunk in self.downloads.chunks(video):
            yield offset, chunk, video.size
            offset += len(chunk)


def _new_record(request: VideoRequest) -> JobRecord:
    plan = request.plan
    return JobRecord(
        id=new_job_id(), model=request.model, prompt=request.prompt, negative_prompt=request.negative_prompt,
        seconds=plan.seconds, width=plan.width, height=plan.height, fps=plan.fps, seed=plan.seed,
        has_image=request.image is not None, total_steps=plan.num_inference_steps, enhance_prompt=request.enhance_prompt,
        inputs=[vars(PHOTO_INPUT)] if request.image is not None else [],
    )
