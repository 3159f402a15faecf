"""Where a finished video is, and how a client gets it: a redirect to a signed URL, or a stream.

The object's key derives from the job id (checked at the route) and the
attempt the record's fenced "completed" write named (``result_attempt``,
checked to be an attempt number). Nothing else in the record is read: a path
or key written into it by hand goes nowhere. A video past its ``expires_at``
is gone: its objects are removed when it is asked for (the sweeps remove the
rest) and the API answers "expired" (HTTP 410, gRPC NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from serving.errors import Expired, NotFound, NotReady
from serving.jobs.job_storage import JobStorage
from serving.jobs.record import JobRecord
from serving.jobs.retention import expires_at, is_expired
from serving.protocol import JobStatus

__all__ = ["StoredVideoFile", "VideoDownloads"]

logger = logging.getLogger("ray.serve.reelserve.ingress")


@dataclass(frozen=True)
class StoredVideoFile:
    """A finished MP4: an object of the results store (``key``), or a local file of a record written before
    results were kept per attempt (``path``); ``url`` is a signed URL when downloads are redirects."""

    size: int
    key: str | None = None
    path: Path | None = None
    url: str | None = None


class VideoDownloads:
    def __init__(self, storage: JobStorage, chunk_bytes: int):
        self.storage = storage
        self.chunk_bytes = chunk_bytes

    async def locate(self, record: JobRecord, sign: bool) -> StoredVideoFile:
        """The job's MP4, or ``NotReady`` (not completed), ``Expired`` or ``NotFound`` (no longer stored)."""
        if record.status != JobStatus.COMPLETED:
            raise NotReady(f"video '{record.id}' is {record.status.api_name}; its content is available once completed")
        await self.refuse_if_expired(record)
        if record.result_attempt is None:
            return await self._legacy(record)
        try:
            key = self.storage.video_key(record.id, record.result_attempt)
        except ValueError:
            logger.error("job %s: its record names no attempt number as its result (result_attempt %r); refused",
                         record.id, record.result_attempt)
            raise NotFound(f"the content of video '{record.id}' is no longer stored") from None
        if sign and self.storage.signs_downloads:
            url = await self.storage.results.signed_url_async(key, self.storage.config.signed_url_ttl_s)
            return StoredVideoFile(size=record.result_bytes, key=key, url=url)
        info = await self.storage.results.head_async(key)
        if info is None:
            raise NotFound(f"the content of video '{record.id}' is no longer stored")
        return StoredVideoFile(size=info.size, key=key)

    async def signed_url(self, record: JobRecord) -> str:
        """A signed URL of the finished MP4 (what gRPC's GetVideo carries), or ``""``."""
        if record.status != JobStatus.COMPLETED or not self.storage.signs_downloads or _expired(record, self.storage):
            return ""
        try:
            return (await self.locate(record, sign=True)).url or ""
        except NotFound:
            return ""

    async def refuse_if_expired(self, record: JobRecord) -> None:
        """``Expired`` once the job's time is up, after removing its objects (the sweeps would, later)."""
        if not _expired(record, self.storage):
            return
        try:
            await asyncio.to_thread(self.storage.remove_job, record.id)
        except Exception as error:  # noqa: BLE001 - the sweeps remove them
            logger.info("removing the objects of expired job %s failed: %r", record.id, error)
        when = datetime.fromtimestamp(cast(float, expires_at(record, self.storage.config.results_ttl_s)), tz=UTC)
        raise Expired(f"video '{record.id}' expired at {when:%Y-%m-%dT%H:%M:%SZ}; its content is no longer kept")

    async def chunks(self, video: StoredVideoFile) -> AsyncIterator[bytes]:
        """The MP4 in chunks of at most ``chunk_bytes``."""
        if video.path is not None:
            with open(video.path, "rb") as handle:  # noqa: ASYNC230 - each read runs in a thread below
                while chunk := await asyncio.to_thread(handle.read, self.chunk_bytes):
                    yield chunk
            return
        stream = await self.storage.results.stream_async(cast(str, video.key), self.chunk_bytes)  # no path: a key
        if stream is None:
            raise NotFound("the content of this video is no longer stored")
        async for chunk in stream:
            yield chunk

    async def _legacy(self, record: JobRecord) -> StoredVideoFile:
        path = self.storage.legacy_video_path(record.id)
        size = await asyncio.to_thread(_size_of, path) if path is not None else None
        if size is None:
            raise NotFound(f"the content of video '{record.id}' is no longer stored")
        return StoredVideoFile(size=size, path=path)


def _expired(record: JobRecord, storage: JobStorage) -> bool:
    return is_expired(record, storage.config.results_ttl_s, time.time())


def _size_of(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
