"""Image conditioner stage: photo bytes -> ImageCondition (first-frame latents)."""

from __future__ import annotations

from cluster.config import ModelConfig
from serving.families import get_family
from serving.media import load_photo
from serving.protocol import ImageCondition
from serving.stages._base import LoadTimer, StageRunner

__all__ = ["ImageConditionerStage"]


class ImageConditionerStage:
    def __init__(self, model: ModelConfig):
        with LoadTimer("image_conditioner", model.name) as load:
            self._conditioner = get_family(model.family).image_conditioner(model)
        self._runner = StageRunner("image_conditioner", model.name)
        self._runner.stats.load_seconds = load.seconds

    async def condition(self, photo: bytes, width: int, height: int) -> ImageCondition:
        return await self._runner.run(self._condition, photo, width, height)

    def _condition(self, photo: bytes, width: int, height: int) -> ImageCondition:
        return self._conditioner.condition(load_photo(photo), width, height)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
