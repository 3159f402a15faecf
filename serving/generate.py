"""One job in one process, no cluster: the path of ``reelserve generate`` without ``--address``.

The family's own pipeline runs over an in-process job context: each
``ctx.call`` runs the stage's component directly, in order, and hands its
output (the payload itself, no copies kept) to the next call. Diffusion runs
one request through the family's engine and reports each step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from cluster.config import ModelConfig
from serving.errors import InvalidRequest
from serving.families import get_family
from serving.families.base import MediaInput
from serving.jobs.record import PHOTO_INPUT
from serving.media import mux_mp4
from serving.protocol import InputSpec, JobInput, JobSpec, StoredVideo
from serving.requests import VideoRequest, validate_request

__all__ = ["LocalGenerator", "InProcessContext"]

StageListener = Callable[[str, float], None]  # (stage name, seconds it took)
StepListener = Callable[[int, int], None]  # (finished steps, total steps)


class LocalGenerator:
    """Loads a family's stages once and runs requests through its pipeline, in this process."""

    def __init__(self, config: ModelConfig):
        self.config = _without_checkpoints(config)
        self.family = get_family(config.family)
        self.limits = self.family.read_limits(config)
        self._count_tokens = self.family.token_counter(config)
        self._components: dict[str, Any] = {}

    def validate(self, **fields) -> VideoRequest:
        return validate_request(config=self.config, limits=self.limits, count_tokens=self._count_tokens, **fields)

    def load(self) -> None:
        """Load every stage's weights (done on first ``generate`` if not called)."""
        for spec in self.family.stages:
            if spec.name in self._components:
                continue
            if spec.kind == "model":
                assert spec.component is not None  # a model stage declares its component
                self._components[spec.name] = spec.component(self.config)
            elif spec.kind == "diffusion":
                self._components[spec.name] = self.family.diffusion_model(self.config)

    def admit(self, media: list[MediaInput]) -> list[tuple[InputSpec, bytes]]:
        """The request's files checked by the family and named as the served path stores them (``InvalidRequest``
        naming the file otherwise); a family without ``admit_inputs`` takes one first-frame photo."""
        if self.family.admit_inputs is not None:
            specs = self.family.admit_inputs(self.config, media)
            return [(spec, item.data) for spec, item in zip(specs, media)]
        for item in media[1:] if media and media[0].role == "first_frame" else media:
            raise InvalidRequest(item.field, f"model '{self.config.name}' animates one first frame (the photo); last "
                                             "frames and references need a model that takes them")
        return [(PHOTO_INPUT, media[0].data)] if media else []

    def generate(
        self,
        request: VideoRequest,
        out_path: str | Path,
        on_step: StepListener | None = None,
        on_stage: StageListener | None = None,
        inputs: list[tuple[InputSpec, bytes]] | None = None,
    ) -> Path:
        """``inputs``: what ``admit`` returned (default: the request's photo, if any)."""
        self.load()
        if inputs is None:
            inputs = [(PHOTO_INPUT, request.image)] if request.image is not None else []
        job = JobSpec(
            job_id="local", prompt=request.prompt, negative_prompt=request.negative_prompt, plan=request.plan,
            inputs=tuple(spec for spec, _ in inputs),
        )
        files = {spec.name: data for spec, data in inputs}
        context = InProcessContext(self.family, self._components, job, files, Path(out_path), on_step, on_stage)
        asyncio.run(self.family.pipeline(context, job, self.config))
        return Path(out_path)


class InProcessContext:
    """``serving.protocol.JobContext`` over components in this process: each call runs at once, in order."""

    def __init__(self, family, components: dict[str, Any], job: JobSpec, inputs: dict[str, bytes], out_path: Path,
                 on_step: StepListener | None = None, on_stage: StageListener | None = None):
        self.family, self.components, self.job = family, components, job
        self._inputs, self._out_path = inputs, out_path
        self._on_step, self._on_stage = on_step, on_stage

    async def call(self, stage: str, method: str, *args: Any) -> Any:
        spec = self.family.stage(stage)
        spec.outputs(method)  # an unknown method fails here
        args = tuple(self._inputs[a.name] if isinstance(a, JobInput) else a for a in args)
        started = time.perf_counter()
        if spec.kind == "model":
            result = getattr(self.components[stage], method)(*args)
        elif spec.kind == "diffusion":
            result = self._denoise(self.components[stage], args)
        else:
            path = mux_mp4(self._out_path, *args)
            result = StoredVideo(attempt=1, num_bytes=path.stat().st_size)
        if self._on_stage is not None:
            self._on_stage(stage, time.perf_counter() - started)
        return result

    async def gather(self, *calls, label: str | None = None) -> tuple[Any, ...]:
        return tuple([None if call is None else await call for call in calls])

    def job_input(self, name: str) -> JobInput:
        return JobInput(self.job.job_id, name)

    async def rewritten_prompt(self) -> str:
        return self.job.prompt  # the rewriter runs only in a served cluster

    def _denoise(self, diffusion, args: tuple) -> Any:
        """One request through the family's engine, step by step; the outputs as the stage declares them."""
        output = diffusion.engine.run_alone(diffusion.request("local", *args), self._on_step)
        outputs = diffusion.outputs(output)
        return outputs[0] if len(outputs) == 1 else outputs


def _without_checkpoints(config: ModelConfig) -> ModelConfig:
    """One request at a time, nobody to resume: the engine hands out no checkpoints."""
    loop = getattr(config, "diffusion", None)
    if loop is None or not hasattr(loop, "checkpoint_every_steps"):
        return config
    return config.model_copy(update={"diffusion": loop.model_copy(update={"checkpoint_every_steps": 0})})
