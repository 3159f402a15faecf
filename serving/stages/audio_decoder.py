"""Audio decoder stage: audio latents -> waveform (audio VAE + vocoder)."""

from __future__ import annotations

from cluster.config import ModelConfig
from serving.families import get_family
from serving.protocol import DenoisedLatents, Waveform
from serving.stages._base import LoadTimer, StageRunner

__all__ = ["AudioDecoderStage"]


class AudioDecoderStage:
    def __init__(self, model: ModelConfig):
        with LoadTimer("audio_decoder", model.name) as load:
            self._decoder = get_family(model.family).audio_decoder(model)
        self._runner = StageRunner("audio_decoder", model.name)
        self._runner.stats.load_seconds = load.seconds

    async def decode(self, latents: DenoisedLatents) -> Waveform:
        return await self._runner.run(self._decoder.decode, latents)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
