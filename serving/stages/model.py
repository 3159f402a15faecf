"""A model stage: one component of a family (a text encoder, a photo encoder, a decoder) as a deployment.

The family declares the stage (``StageSpec``): the component it loads and the
methods a pipeline may call, each with the names of its outputs. This
deployment knows no family: it loads what the declaration names, reads each
call's hand-offs back into payloads (and the job's stored inputs by name),
runs the method on the model one request at a time, and hands the outputs on.
"""

from __future__ import annotations

from typing import Any

from cluster.config import FaultConfig, JobsConfig, ModelConfig, StorageConfig
from serving.devices import resolve_device
from serving.errors import GenerationFailed
from serving.families import get_family
from serving.jobs.job_storage import register_stored_types
from serving.protocol import Handoff, JobInput, JobTicket
from serving.stages._base import LoadTimer, StageRunner, placement

__all__ = ["ModelStage"]


class ModelStage:
    def __init__(self, stage: str, model: ModelConfig, jobs: JobsConfig, faults: list[FaultConfig] = (),
                 storage: StorageConfig | None = None):
        family = get_family(model.family)
        self._spec = family.stage(stage)
        if self._spec.kind != "model" or self._spec.component is None:
            raise ValueError(f"stage {stage} of the {model.family} family is not a model stage")
        with LoadTimer(stage, model.name) as load:
            self._component = self._spec.component(model)
        self._device = str(resolve_device(model.device))  # what the family computes on
        register_stored_types(family)
        self._runner = StageRunner(stage, jobs, faults, model.name, storage=storage)
        self._runner.stats.load_seconds = load.seconds

    async def call(self, ticket: JobTicket, method: str, *args: Any) -> Handoff | tuple[Handoff, ...]:
        """Run ``method`` on the call's payloads; its outputs leave as hand-offs named as the family declares."""
        names = self._spec.outputs(method)
        payloads = [await self._payload(arg) for arg in args]
        result = await self._runner.run(ticket, getattr(self._component, method), *payloads)
        values = result if len(names) > 1 else (result,)
        if len(values) != len(names):
            raise GenerationFailed(f"{self._spec.name}.{method} returned {len(values)} outputs, not {len(names)}")
        handoffs = tuple([await self._runner.publish(ticket, name, value) for name, value in zip(names, values)])
        return handoffs[0] if len(handoffs) == 1 else handoffs

    async def _payload(self, arg: Any) -> Any:
        if isinstance(arg, Handoff):
            return await self._runner.receive(arg)
        if isinstance(arg, JobInput):  # the job's own input: read here, never carried through the runner
            return await self._runner.read_input(arg)
        return arg

    async def ready(self) -> bool:
        """Answers once this replica is up (its constructor loaded the model): the runner claims jobs only then."""
        return True

    def stats(self) -> dict:
        return self._runner.stats.snapshot()

    def placement(self) -> dict:
        return placement(self._device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._runner.load.report()
