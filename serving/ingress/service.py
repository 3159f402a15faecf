"""What both ingresses do, once: validate, submit, look up, cancel, watch, read results."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from cluster.config import ReelserveConfig
from serving.errors import InvalidRequest, NotFound, NotReady
from serving.families import get_family
from serving.jobs.orchestrator import Orchestrator, StageHandles
from serving.jobs.record import JobRecord
from serving.jobs.results import ResultStore
from serving.jobs.store import open_store
from serving.protocol import JobStatus
from serving.requests import validate_request

__all__ = ["VideoService", "CHUNK_BYTES"]

CHUNK_BYTES = 1024 * 1024  # gRPC clients receive at most 4 MiB per message
_WATCH_POLL_S = 0.2
MAX_PAGE = 100


class VideoService:
    def __init__(self, config: ReelserveConfig, stages: StageHandles):
        self.config = config
        family = get_family(config.model.family)
        self.limits = family.read_limits(config.model)
        self._count_tokens = family.token_counter(config.model)
        jobs = config.jobs
        self.store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)
        self.results = ResultStore(jobs.results_dir)
        self.orchestrator = Orchestrator(
            self.store, self.results, stages, jobs, temporal_compression=self.limits.temporal_compression,
            prompt_fits=lambda text: self._count_tokens(text) <= self.limits.max_prompt_tokens,
            rewrite_timeout_s=config.rewriter.timeout_s, rewriter_sees_photo=config.rewriter.multimodal,
        )

    def start(self) -> None:
        self.orchestrator.start()

    async def stop(self) -> None:
        await self.orchestrator.stop()

    # ------------------------------------------------------------------ jobs

    def create(self, field_names: dict[str, str] | None = None, **fields) -> JobRecord:
        request = validate_request(
            config=self.config.model, limits=self.limits, count_tokens=self._count_tokens,
            enhance_default=self.config.rewriter.enhance_by_default, rewriter_available=self.config.rewriter.enabled,
            field_names=field_names, **fields,
        )
        return self.orchestrator.submit(request)

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id) if isinstance(job_id, str) and job_id else None
        if record is None or record.delete_requested:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        if order not in ("asc", "desc"):
            raise InvalidRequest("order", f"'{order}' is not allowed; use asc or desc")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest("limit", f"{limit} is out of range; allowed: 1 to {MAX_PAGE}")
        if after:
            self.get(after)  # an unknown cursor is an error, not an empty page
        records, has_more = self.store.list(after=after or None, limit=limit, order=order)
        return [r for r in records if not r.delete_requested], has_more

    def cancel(self, job_id: str) -> JobRecord:
        self.get(job_id)
        record = self.orchestrator.cancel(job_id)
        if record is None:
            raise NotFound(f"no video with id '{job_id}'")
        return record

    def delete(self, job_id: str) -> None:
        self.get(job_id)
        self.orchestrator.cancel(job_id, delete=True)

    def result_path(self, job_id: str) -> Path:
        record = self.get(job_id)
        if record.status != JobStatus.COMPLETED:
            raise NotReady(f"video '{job_id}' is {record.status.api_name}; its content is available once completed")
        path = Path(record.result_path or self.results.video_path(job_id))
        if not path.is_file():
            raise NotFound(f"the content of video '{job_id}' is no longer stored")
        return path

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job each time its progress rises, then once more when it ends."""
        record = self.get(job_id)
        last_progress = -1
        while True:
            if record.progress > last_progress or record.status.is_terminal:
                last_progress = record.progress
                yield record
            if record.status.is_terminal:
                return
            await asyncio.sleep(_WATCH_POLL_S)
            record = self.get(job_id)

    def read_chunks(self, job_id: str):
        """``(offset, data, total)`` chunks of the finished MP4."""
        path = self.result_path(job_id)
        total = path.stat().st_size
        with open(path, "rb") as handle:
            offset = 0
            while chunk := handle.read(CHUNK_BYTES):
                yield offset, chunk, total
                offset += len(chunk)
