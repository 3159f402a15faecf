"""Text encoder stage: prompt + negative prompt -> PromptEmbeddings."""

from __future__ import annotations

from cluster.config import ModelConfig
from serving.families import get_family
from serving.protocol import PromptEmbeddings
from serving.stages._base import LoadTimer, StageRunner

__all__ = ["TextEncoderStage"]


class TextEncoderStage:
    def __init__(self, model: ModelConfig):
        with LoadTimer("text_encoder", model.name) as load:
            self._encoder = get_family(model.family).text_encoder(model)
        self._runner = StageRunner("text_encoder", model.name)
        self._runner.stats.load_seconds = load.seconds

    async def encode(self, prompt: str, negative_prompt: str | None) -> PromptEmbeddings:
        return await self._runner.run(self._encoder.encode, prompt, negative_prompt)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
