"""A model stage: one component of a family (a text encoder, a photo encoder, a decoder) as a deployment.

The family declares the stage (``StageSpec``): the component it loads and the
methods a pipeline may call, each with the names of its outputs. This
deployment knows no family: it loads what the declaration names, reads each
call's hand-offs back into payloads (and the job's stored inputs by name),
runs the method on the model one request at a time, and hands the outputs on.

Its constructor does the whole start (``serving.stages.startup``): the node-local
weights copy, the memory cap of a shared GPU, the load straight onto the device,
then the component's warm-up; Serve routes nothing to the replica before it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.config import FaultConfig, JobsConfig, ModelConfig, StorageConfig
from cluster.startup_config import StageRuntime
from serving.devices import resolve_device
from serving.errors import GenerationFailed
from serving.families import get_family
from serving.jobs.job_storage import register_stored_types
from serving.protocol import Handoff, JobInput, JobTicket
from serving.stages._base import LoadTimer, StageRunner, placement
from serving.stages.startup import cap_memory, export_loads, local_weights, warm_up

__all__ = ["ModelStage"]


class ModelStage:
    def __init__(self, stage: str, model: ModelConfig, jobs: JobsConfig, faults: Sequence[FaultConfig] = (),
                 storage: StorageConfig | None = None, runtime: StageRuntime | None = None):
        family = get_family(model.family)
        self._spec = family.stage(stage)
        if self._spec.kind != "model" or self._spec.component is None:
            raise ValueError(f"stage {stage} of the {model.family} family is not a model stage")
        runtime = runtime or StageRuntime()
        register_stored_types(family)  # its hand-offs are kept without pickle: the codec must know their types
        self._runner = StageRunner(stage, jobs, faults, model.name, storage=storage)
        self._device = str(resolve_device(model.device))  # what the family computes on
        self._memory_fraction = cap_memory(self._device, runtime.memory_fraction)
        with LoadTimer(stage, model.name) as load:
            self._component = self._spec.component(local_weights(model, self._spec, runtime))
        self._runner.stats.load_seconds = load.seconds
        self._loads = export_loads(stage, model.name, getattr(self._component, "loaded", None))
        self._warmup_seconds = warm_up(stage, model.name, getattr(self._component, "warm_up", None), runtime,
                                       self._runner.faults)

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
        """Answers once this replica is up (its constructor loaded and warmed up the model): the runner claims jobs
        only then."""
        return True

    def stats(self) -> dict:
        return {**self._runner.stats.snapshot(), "component_load_seconds": self._loads,
                "warmup_seconds": self._warmup_seconds}

    def placement(self) -> dict:
        return {**placement(self._device), "memory_fraction": self._memory_fraction}

    async def check_health(self) -> None:
        """Dead once its device broke (the process is about to end; Serve starts another)."""
        self._runner.health.check()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        assert self._runner.load is not None  # a StageRunner tracks load unless told not to
        return self._runner.load.report()
