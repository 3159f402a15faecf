"""Image conditioner stage: the job's photo (from the results volume) -> first-frame latents (ImageCondition)."""

from __future__ import annotations

from cluster.config import FaultConfig, JobsConfig, ModelConfig
from serving.families import get_family
from serving.families.base import resolve_device
from serving.jobs.results import ResultStore
from serving.media import load_photo
from serving.protocol import Handoff, ImageCondition, JobTicket
from serving.stages._base import LoadTimer, StageRunner, placement

__all__ = ["ImageConditionerStage"]


class ImageConditionerStage:
    def __init__(self, model: ModelConfig, jobs: JobsConfig, faults: list[FaultConfig] = ()):
        with LoadTimer("image_conditioner", model.name) as load:
            self._conditioner = get_family(model.family).image_conditioner(model)
        self._results = ResultStore(jobs.results_dir)
        self._device = str(resolve_device(model.device))  # what the family computes on
        self._runner = StageRunner("image_conditioner", jobs, faults, model.name)
        self._runner.stats.load_seconds = load.seconds

    async def condition(self, ticket: JobTicket, width: int, height: int) -> Handoff:
        condition = await self._runner.run(ticket, self._condition, ticket.job_id, width, height)
        return await self._runner.publish(ticket, "image_condition", condition)

    def _condition(self, job_id: str, width: int, height: int) -> ImageCondition:
        # The photo was checked when the job was accepted; it is read here, not carried through the orchestrator.
        return self._conditioner.condition(load_photo(self._results.load_input(job_id)), width, height)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(self._device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
