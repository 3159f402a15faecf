"""Muxer stage: the H.264 track + the waveform -> MP4 (AAC added), put in the results store under the attempt.

Family-free: every family hands it an ``EncodedVideo`` and a ``Waveform``.
The MP4 is written to a temporary file of its own (removed whatever happens),
then put as one object at ``results/<job>/<attempt>/video.mp4``: attempts never
share an object, and a reader sees a whole MP4 or none. It becomes the job's
result only through the runner's fenced "completed" write. An attempt that is
no longer the job's current one (a replaced owner whose call ran on) puts
nothing, and takes back what it put if it was replaced meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cluster.config import FaultConfig, JobsConfig, StorageConfig
from serving.errors import GenerationFailed, StoreUnavailable
from serving.jobs.backends import open_store
from serving.jobs.job_storage import patiently
from serving.media import mux_mp4
from serving.protocol import Handoff, JobTicket, StoredVideo
from serving.stages._base import StageRunner, placement

__all__ = ["MuxerStage", "StaleAttempt"]

logger = logging.getLogger("ray.serve.reelserve.stage")


class StaleAttempt(GenerationFailed):
    """The job's record names another attempt now (or the job is gone): this attempt's MP4 is not kept."""


class MuxerStage:
    def __init__(self, jobs: JobsConfig, faults: Sequence[FaultConfig] = (), model_name: str = "unknown",
                 storage: StorageConfig | None = None):
        self._runner = StageRunner("muxer", jobs, faults, model_name, storage)
        self._store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)

    async def call(self, ticket: JobTicket, method: str, video: Handoff, waveform: Handoff) -> StoredVideo:
        if method != "mux":
            raise GenerationFailed(f"the muxer has no method '{method}'; it has mux")
        encoded = await self._runner.receive(video)
        audio = await self._runner.receive(waveform)
        storage = self._runner.storage
        with tempfile.TemporaryDirectory(prefix="reelserve-mux-") as folder:
            path = await self._runner.run(ticket, mux_mp4, Path(folder) / "video.mp4", encoded, audio)
            await self._refuse_if_stale(ticket)
            size = await patiently(storage.save_video, ticket.job_id, ticket.attempt, path,
                                   wait_s=storage.config.outage_wait_s, what=f"job {ticket.job_id}: storing its MP4")
        if not await self._is_current(ticket):  # replaced while the MP4 went up: take it back
            await asyncio.to_thread(storage.results.delete, storage.video_key(ticket.job_id, ticket.attempt))
            self._stale(ticket)
        return StoredVideo(attempt=ticket.attempt, num_bytes=size)

    async def _refuse_if_stale(self, ticket: JobTicket) -> None:
        if not await self._is_current(ticket):
            self._stale(ticket)

    async def _is_current(self, ticket: JobTicket) -> bool:
        """Whether the record still names this attempt and the job still runs (an unreachable store: assume so)."""
        try:
            record = await asyncio.to_thread(self._store.get, ticket.job_id)
        except StoreUnavailable:
            return True  # the runner's fenced write decides; a sweep removes an MP4 that lost
        return (record is not None and not record.status.is_terminal and not record.delete_requested
                and record.attempts == ticket.attempt)

    def _stale(self, ticket: JobTicket) -> None:
        self._runner.stats.bump("stale_results_refused_total")
        logger.info("job %s attempt %d is no longer the job's; its MP4 is not kept", ticket.job_id, ticket.attempt)
        raise StaleAttempt(f"attempt {ticket.attempt} of the job was replaced; its MP4 is not kept")

    async def ready(self) -> bool:
        """Answers once this replica is up (its constructor loaded the model): the runner claims jobs only then."""
        return True

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(None)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        assert self._runner.load is not None  # a StageRunner tracks load unless told not to
        return self._runner.load.report()
