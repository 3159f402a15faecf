"""Muxer stage: the H.264 track + the waveform -> MP4 (AAC added) in the results directory.

Family-free: every family hands it an ``EncodedVideo`` and a ``Waveform``.
"""

from __future__ import annotations

from cluster.config import FaultConfig, JobsConfig
from serving.errors import GenerationFailed
from serving.jobs.results import ResultStore
from serving.media import mux_mp4
from serving.protocol import EncodedVideo, Handoff, JobTicket, StoredVideo, Waveform
from serving.stages._base import StageRunner, placement

__all__ = ["MuxerStage"]


class MuxerStage:
    def __init__(self, jobs: JobsConfig, faults: list[FaultConfig] = (), model_name: str = "unknown"):
        self._results = ResultStore(jobs.results_dir)
        self._runner = StageRunner("muxer", jobs, faults, model_name)

    async def call(self, ticket: JobTicket, method: str, video: Handoff, waveform: Handoff) -> StoredVideo:
        if method != "mux":
            raise GenerationFailed(f"the muxer has no method '{method}'; it has mux")
        encoded = await self._runner.receive(video)
        audio = await self._runner.receive(waveform)
        return await self._runner.run(ticket, self._mux, ticket.job_id, encoded, audio)

    def _mux(self, job_id: str, video: EncodedVideo, waveform: Waveform) -> StoredVideo:
        path = mux_mp4(self._results.video_path(job_id), video, waveform)
        return StoredVideo(path=str(path), num_bytes=path.stat().st_size)

    async def ready(self) -> bool:
        """Answers once this replica is up (its constructor loaded the model): the runner claims jobs only then."""
        return True

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(None)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
