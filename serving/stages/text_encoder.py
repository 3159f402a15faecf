"""Text encoder stage: prompt + negative prompt -> the text connectors' outputs (PromptEmbeddings)."""

from __future__ import annotations

from cluster.config import FaultConfig, JobsConfig, ModelConfig
from serving.families import get_family
from serving.families.base import resolve_device
from serving.protocol import Handoff, JobTicket
from serving.stages._base import LoadTimer, StageRunner, placement

__all__ = ["TextEncoderStage"]


class TextEncoderStage:
    def __init__(self, model: ModelConfig, jobs: JobsConfig, faults: list[FaultConfig] = ()):
        with LoadTimer("text_encoder", model.name) as load:
            self._encoder = get_family(model.family).text_encoder(model)
        self._device = str(resolve_device(model.device))  # what the family computes on
        self._runner = StageRunner("text_encoder", jobs, faults, model.name)
        self._runner.stats.load_seconds = load.seconds

    async def encode(self, ticket: JobTicket, prompt: str, negative_prompt: str | None) -> Handoff:
        embeddings = await self._runner.run(ticket, self._encoder.encode, prompt, negative_prompt)
        return await self._runner.publish(ticket, "prompt_embeddings", embeddings)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(self._device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
