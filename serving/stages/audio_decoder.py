"""Audio decoder stage: audio latents -> waveform (audio VAE + vocoder)."""

from __future__ import annotations

from cluster.config import FaultConfig, JobsConfig, ModelConfig
from serving.families import get_family
from serving.families.base import resolve_device
from serving.protocol import Handoff, JobTicket
from serving.stages._base import LoadTimer, StageRunner, placement

__all__ = ["AudioDecoderStage"]


class AudioDecoderStage:
    def __init__(self, model: ModelConfig, jobs: JobsConfig, faults: list[FaultConfig] = ()):
        with LoadTimer("audio_decoder", model.name) as load:
            self._decoder = get_family(model.family).audio_decoder(model)
        self._device = str(resolve_device(model.device))  # what the family computes on
        self._runner = StageRunner("audio_decoder", jobs, faults, model.name)
        self._runner.stats.load_seconds = load.seconds

    async def decode(self, ticket: JobTicket, latents: Handoff) -> Handoff:
        audio_latents = await self._runner.receive(latents)
        waveform = await self._runner.run(ticket, self._decoder.decode, audio_latents)
        return await self._runner.publish(ticket, "waveform", waveform)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(self._device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
