"""Video decoder stage: video latents -> RGB frames."""

from __future__ import annotations

from cluster.config import ModelConfig
from serving.families import get_family
from serving.protocol import DenoisedLatents, RenderPlan, VideoFrames
from serving.stages._base import LoadTimer, StageRunner

__all__ = ["VideoDecoderStage"]


class VideoDecoderStage:
    def __init__(self, model: ModelConfig):
        with LoadTimer("video_decoder", model.name) as load:
            self._decoder = get_family(model.family).video_decoder(model)
        self._runner = StageRunner("video_decoder", model.name)
        self._runner.stats.load_seconds = load.seconds

    async def decode(self, latents: DenoisedLatents, plan: RenderPlan) -> VideoFrames:
        return await self._runner.run(self._decoder.decode, latents, plan)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
