"""Video decoder stage: video latents -> frames -> H.264. Frames never leave the stage; the compressed
track does (about 2 MB for 1280x704 x 5 s instead of 324 MB of frames)."""

from __future__ import annotations

from cluster.config import FaultConfig, JobsConfig, ModelConfig
from serving.families import get_family
from serving.families.base import resolve_device
from serving.protocol import Handoff, JobTicket, RenderPlan
from serving.stages._base import LoadTimer, StageRunner, placement

__all__ = ["VideoDecoderStage"]


class VideoDecoderStage:
    def __init__(self, model: ModelConfig, jobs: JobsConfig, faults: list[FaultConfig] = ()):
        with LoadTimer("video_decoder", model.name) as load:
            self._decoder = get_family(model.family).video_decoder(model)
        self._device = str(resolve_device(model.device))  # what the family computes on
        self._runner = StageRunner("video_decoder", jobs, faults, model.name)
        self._runner.stats.load_seconds = load.seconds

    async def decode(self, ticket: JobTicket, latents: Handoff, plan: RenderPlan) -> Handoff:
        video_latents = await self._runner.receive(latents)
        encoded = await self._runner.run(ticket, self._decoder.decode, video_latents, plan)
        return await self._runner.publish(ticket, "encoded_video", encoded)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(self._device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
