"""Video decoder stage: video latents -> frames -> H.264 (frames never leave the stage)."""

from __future__ import annotations

from cluster.config import ModelConfig
from serving.families import get_family
from serving.protocol import DenoisedLatents, EncodedVideo, RenderPlan
from serving.stages._base import StageRunner

__all__ = ["VideoDecoderStage"]


class VideoDecoderStage:
    def __init__(self, model: ModelConfig):
        self._decoder = get_family(model.family).video_decoder(model)
        self._runner = StageRunner("video_decoder")

    async def decode(self, latents: DenoisedLatents, plan: RenderPlan) -> EncodedVideo:
        return await self._runner.run(self._decoder.decode, latents.video, plan)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
