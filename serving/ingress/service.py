"""What both ingresses do, once: validate, record, look up, cancel, watch, read results — for one tenant.

The ingress is stateless: it records accepted jobs in the store and wakes a
runner; it never runs a job, so redeploying or scaling it loses nothing.
Everything that blocks (store calls, photo decoding, tokenizing) runs in
worker threads, never on the event loop; photo decodes wait for room in a
memory budget. Every call carries the caller's tenant: another tenant's job
answers exactly as an unknown one (404).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, AsyncIterator, Sequence

from cluster.admission import AdmissionLimits
from cluster.auth_config import CallbacksConfig, ReferencesConfig
from cluster.config import IngressConfig, JobsConfig, ModelConfig, RewriterConfig, StorageConfig
from serving import metrics
from serving.errors import InvalidRequest, NotFound, Overloaded, StoreUnavailable
from serving.families import get_family
from serving.ingress.capacity import QueueView
from serving.ingress.client_media import ClientMedia, MediaFetcher
from serving.ingress.downloads import StoredVideoFile, VideoDownloads
from serving.ingress.gate import CreateTicket, TenantGate
from serving.ingress.photo_limits import DecodeBudget, decode_photo
from serving.jobs.backends import open_store
from serving.jobs.events import JobEvents
from serving.jobs.job_storage import JobStorage
from serving.jobs.record import PHOTO_INPUT, JobRecord, new_job_id
from serving.protocol import InputSpec
from serving.requests import VideoRequest, validate_request
from serving.storage.keys import check_job_id
from serving.tenancy.auth import Tenant

__all__ = ["VideoService", "CHUNK_BYTES", "HEARTBEAT_S"]

CHUNK_BYTES = 1024 * 1024  # gRPC clients receive at most 4 MiB per message
HEARTBEAT_S = 10.0  # a watcher hears from a waiting job at least this often (proxies cut idle streams)
_WATCH_WAIT_S = 5.0  # a watcher re-reads at least this often even if no notification arrives
_STORAGE_FRESH_S = 1.0  # a job without a photo checks that storage answers at most this often
MAX_PAGE = 100


class VideoService:
    def __init__(
        self, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig, orchestrator=None,
        limits: AdmissionLimits | None = None, ingress: IngressConfig | None = None, auth=None,
        callbacks: CallbacksConfig | None = None, storage: StorageConfig | None = None,
        references: ReferencesConfig | None = None,
    ):
        self.model, self.jobs, self.rewriter = model, jobs, rewriter
        self.fetcher = MediaFetcher(references or ReferencesConfig())
        self.ingress = ingress or IngressConfig()
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
        self.gate = TenantGate(auth, callbacks or CallbacksConfig(), jobs)
        self._orchestrator = orchestrator  # a deployment handle: woken after each accepted job
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ingress-io")
        self.queue = QueueView(self.store, model, limits, self.gate.authenticator.tenants, self._blocking)
        self.decodes = DecodeBudget(self.ingress.decode_memory_mb * 1024**2)

    async def _blocking(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: function(*args, **kwargs))

    async def close(self) -> None:
        await self.events.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ jobs

    async def create(
        self, tenant: Tenant, field_names: dict[str, str] | None = None, *, priority: Any = None,
        callback_url: Any = None, idempotency_key: Any = None, media: Sequence[ClientMedia] = (),
        image: bytes | None = None, max_queue_wait_s: float | None = None, return_last_frame: bool = False, **fields,
    ) -> JobRecord:
        """Record a job. ``media``: the request's files as the client sent them (``image``: gRPC's photo, the first
        frame); the cheap fields are checked first, then URLs are fetched and the family checks the files' headers."""
        names = field_names or {}
        ticket = self.gate.check_fields(tenant, priority, callback_url, idempotency_key, names)
        request = await self._blocking(self._validate, names, fields)
        media = list(media)
        if image is not None:
            media.insert(0, ClientMedia(names.get("image", "image"), "first_frame", data=image))
        inputs = await self._admit_media(media)
        queue_wait = self.jobs.max_queue_wait_s  # a client may ask for less (Seedance's execution_expires_after)
        if max_queue_wait_s is not None:
            queue_wait = max_queue_wait_s if queue_wait is None else min(queue_wait, max_queue_wait_s)
        record = _new_record(request, ticket, queue_wait, [spec for spec, _ in inputs])
        record.return_last_frame = return_last_frame
        signature = {**fields, "priority": int(ticket.priority), "callback_url": ticket.callback_url,
                     "max_queue_wait_s": max_queue_wait_s, "return_last_frame": return_last_frame}
        blobs: dict[str, bytes | None] = {spec.name: data for spec, data in inputs}
        ticket = await self.gate.reserve(ticket, signature, blobs, record.id, self._blocking)
        if ticket.existing_job_id is not None:  # a retry of a create that already made its job
            return await self.gate.wait_for_first(ticket.existing_job_id, self._get_any)
        try:
            return await self._record(record, ticket, inputs)
        except BaseException:
            await self.gate.release(ticket, record.id, self._blocking)
            raise

    async def _admit_media(self, media: list[ClientMedia]) -> list[tuple[InputSpec, bytes]]:
        """The request's files fetched, checked by the family and named for storage, with their bytes."""
        family = get_family(self.model.family)
        if family.admit_inputs is None:  # one first-frame photo at most (LTX-2)
            for item in media:
                if item.role != "first_frame":
                    raise InvalidRequest(item.field, f"model '{self.model.name}' animates one first frame (the "
                                                     "photo); last frames and references need a model that takes "
                                                     "them (GET /v1/models lists what each model takes)")
            if len(media) > 1:
                raise InvalidRequest(media[1].field, "one first frame at most")
        most = _most_media(self.model)
        if len(media) > most:  # before any fetch or header read
            raise InvalidRequest("references", f"{len(media)} files; model '{self.model.name}' takes at most {most}")
        fetched = await self.fetcher.fetch_all(media)
        if family.admit_inputs is None:
            if not fetched:
                return []
            photo = fetched[0]
            assert photo.data is not None  # fetch_all fetched it
            await decode_photo(photo.data, self.decodes, max_bytes=self.ingress.max_photo_bytes,
                               max_pixels=self.ingress.max_photo_pixels, field=photo.field, executor=self._pool)
            return [(PHOTO_INPUT, photo.data)]
        inputs = [item.as_input() for item in fetched]
        specs = await self._blocking(family.admit_inputs, self.model, inputs)
        return [(spec, item.data) for spec, item in zip(specs, inputs)]

    async def _record(self, record: JobRecord, ticket: CreateTicket,
                      inputs: list[tuple[InputSpec, bytes]]) -> JobRecord:
        jobs = self.jobs
        await self.queue.admit(self.model.name)
        await self.gate.check_rate(ticket.tenant, self._blocking)
        for spec, data in inputs:
            await self._blocking(self.storage.save_input, record.id, spec.name, data)
        if not inputs:
            await self._storage_answers()  # the job's video goes there: no job while it is down
        service_s = self.model.latent_tokens(record.width, record.height, record.seconds, record.fps) * \
            record.total_steps * (await self.queue.current()).seconds_per_token_step
        try:
            created = await self._blocking(self.store.create, record, max_active=jobs.max_active_jobs,
                                           check_tenant=self.gate.tenant_check(ticket.tenant, service_s))
        except BaseException as error:
            await self._forget_inputs(record)  # no job, no photo left behind
            if isinstance(error, Overloaded):
                metrics.admission_refused(self.model.name, getattr(error, "code", "overloaded"), ticket.tenant.name)
            raise
        if not created:
            await self._forget_inputs(record)
            metrics.admission_refused(self.model.name, "max_active_jobs", ticket.tenant.name)
            raise Overloaded(
                f"the server is at its limit of {jobs.max_active_jobs} active jobs; retry later",
                retry_after_s=jobs.retry_after_s,
            )
        if self._orchestrator is not None:
            self._orchestrator.wake.remote()  # not awaited: runners also poll
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

    def _validate(self, names: dict[str, str], fields) -> VideoRequest:
        return validate_request(
            config=self.model, limits=self.limits, count_tokens=self._count_tokens,
            enhance_default=self.rewriter.enhance_by_default, rewriter_available=bool(self.rewriter.enabled),
            field_names=names, photo_checked=True, **fields,
        )

    async def _get_any(self, job_id: str) -> JobRecord | None:
        return await self._blocking(self.store.get, job_id)

    async def get(self, job_id: str, tenant: Tenant) -> JobRecord:
        """The tenant's job; another tenant's, and an id of no job's shape (before any store is asked), answer as
        an unknown id."""
        try:
            check_job_id(job_id)
        except ValueError:
            raise NotFound(f"no video with id {job_id!r}") from None
        record = await self._blocking(self.store.get, job_id)
        if record is None or record.delete_requested or record.tenant != tenant.name:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    async def queue_of(self, record: JobRecord) -> dict[str, Any]:
        """A queued job's position and estimated start (empty once it runs)."""
        try:
            return await self.queue.estimate(record)
        except StoreUnavailable:
            return {}

    async def list(self, tenant: Tenant, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        if order not in ("asc", "desc"):
            raise InvalidRequest("order", f"'{order}' is not allowed; use asc or desc")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest("limit", f"{limit} is out of range; allowed: 1 to {MAX_PAGE}")
        if after:
            await self.get(after, tenant)  # an unknown cursor is an error, not an empty page
        records, has_more = await self._blocking(
            self.store.list, after=after or None, limit=limit, order=order, tenant=tenant.name
        )
        return [r for r in records if not r.delete_requested], has_more

    async def list_page(self, tenant: Tenant, after: str | None,
                        limit: int) -> tuple[Sequence[JobRecord], bool, str | None]:
        """Newest first, like ``list``; also the id of the last record the store returned (before the ones being
        deleted were left out), to page on from."""
        records, has_more = await self._blocking(
            self.store.list, after=after or None, limit=limit, order="desc", tenant=tenant.name
        )
        last_id = records[-1].id if records else None
        return [r for r in records if not r.delete_requested], has_more, last_id

    async def cancel(self, job_id: str, tenant: Tenant) -> JobRecord:
        """Stop the job: at once if nobody claimed it yet, else its runner stops it within one denoising step."""
        await self.get(job_id, tenant)
        record = await self._blocking(self.store.request_cancel, job_id)
        if record is None:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    async def delete(self, job_id: str, tenant: Tenant) -> None:
        await self.get(job_id, tenant)
        # The flag and the job's state in one write: a job that ended meanwhile (or was still queued and ended
        # by this very write) is removed here; a running one is removed by its runner once it stopped.
        record = await self._blocking(self.store.request_cancel, job_id, delete=True)
        if record is not None and record.status.is_terminal:
            await self._blocking(self._remove, job_id)

    def _remove(self, job_id: str) -> None:
        self.storage.remove_job(job_id)  # first: with storage down the client gets a 503 and the record stays
        self.store.delete(job_id)

    async def content(self, job_id: str, tenant: Tenant, sign: bool) -> StoredVideoFile:
        """Where the finished MP4 is: a signed URL (``sign`` and an object store that signs) or something to stream."""
        return await self.downloads.locate(await self.get(job_id, tenant), sign=sign)

    async def download_url(self, record: JobRecord) -> str:
        """A signed URL of the job's MP4 when downloads are redirects and it is completed, else ``""``."""
        return await self.downloads.signed_url(record)

    async def watch(self, job_id: str, tenant: Tenant) -> AsyncIterator[tuple[JobRecord, bool]]:
        """``(job, heartbeat)`` each time its progress rises, at least every ``HEARTBEAT_S`` while it waits
        (``heartbeat`` True: nothing rose, the job is alive), and once more when it ends."""
        loop = asyncio.get_running_loop()
        record = await self.get(job_id, tenant)
        last_progress, last_sent = -1, loop.time()
        while True:
            rose = record.progress > last_progress or record.status.is_terminal
            if rose or loop.time() - last_sent >= HEARTBEAT_S:
                last_progress, last_sent = max(last_progress, record.progress), loop.time()
                yield record, not rose
            if record.status.is_terminal:
                return
            await self.events.wait(job_id, min(_WATCH_WAIT_S, max(0.0, last_sent + HEARTBEAT_S - loop.time())))
            record = await self._reread(job_id, record, tenant)

    async def _reread(self, job_id: str, last: JobRecord, tenant: Tenant) -> JobRecord:
        """The job again; while the store is unreachable the watcher keeps what it had and waits."""
        try:
            return await self.get(job_id, tenant)
        except StoreUnavailable:
            return last

    async def read_chunks(self, job_id: str, tenant: Tenant):
        """``(offset, data, total)`` chunks of the finished MP4."""
        video = await self.content(job_id, tenant, sign=False)
        offset = 0
        async for chunk in self.downloads.chunks(video):
            yield offset, chunk, video.size
            offset += len(chunk)


def _most_media(model: ModelConfig) -> int:
    """Files a request may carry at all: the family's references plus two keyframes (one photo without references)."""
    return int(getattr(model, "max_references", 0)) + 2 if hasattr(model, "max_references") else 1


def _new_record(request: VideoRequest, ticket: CreateTicket, max_queue_wait_s: float | None,
                inputs: list[InputSpec]) -> JobRecord:
    plan = request.plan
    return JobRecord(
        id=new_job_id(), model=request.model, prompt=request.prompt, negative_prompt=request.negative_prompt,
        seconds=plan.seconds, width=plan.width, height=plan.height, fps=plan.fps, seed=plan.seed,
        has_image=bool(inputs), total_steps=plan.num_inference_steps, enhance_prompt=request.enhance_prompt,
        num_inference_steps=plan.num_inference_steps, inputs=[asdict(spec) for spec in inputs],
        tenant=ticket.tenant.name, priority=int(ticket.priority), callback_url=ticket.callback_url,
        max_queue_wait_s=max_queue_wait_s,
    )
