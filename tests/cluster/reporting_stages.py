"""The diffusion stage with its load tracker wired in, as the stage itself is to do it, plus an event log.

``ReportingDiffusionStage`` is ``serving.stages.diffusion.DiffusionStage`` with
what ``cluster.load.DiffusionLoad`` needs: ``queued`` when a request arrives,
``started`` when its denoising begins (under the stage's lock), ``stepped``
after every step, ``finished`` when it leaves, and ``record_autoscaling_stats``
returning the tracker's report. It also appends ``time event replica job``
lines to the file named by ``REELSERVE_TEST_EVENTS`` (inherited by Ray's
workers), so a test can see which replica ran which job and when each
replica stopped.
"""

from __future__ import annotations

import os
import time

from cluster.config import latent_tokens
from cluster.load import DiffusionLoad
from serving.stages.diffusion import DiffusionStage

__all__ = ["ReportingDiffusionStage", "EVENTS_ENV"]

EVENTS_ENV = "REELSERVE_TEST_EVENTS"


class _MeasuredDenoiser:
    """Wraps the family's denoiser: the request starts when denoising does, and every step is timed."""

    def __init__(self, inner, stage: ReportingDiffusionStage):
        self._inner = inner
        self._stage = stage

    def denoise(self, embeddings, condition, plan, on_step):
        key = self._stage.current
        self._stage.load.started(key)
        self._stage.event("start", key)
        last = time.perf_counter()

        def measured(finished: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            self._stage.load.stepped(key, now - last)
            last = now
            on_step(finished, total)

        return self._inner.denoise(embeddings, condition, plan, measured)


class ReportingDiffusionStage(DiffusionStage):
    def __init__(self, model, jobs):
        super().__init__(model, jobs)
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.load = DiffusionLoad()
        self.current: str | None = None
        self._denoiser = _MeasuredDenoiser(self._denoiser, self)
        self.event("up", "-")

    async def denoise(self, job_id, attempt, embeddings, condition, plan):
        key = f"{job_id}/{attempt}"
        tokens = latent_tokens(plan.width, plan.height, plan.seconds, plan.fps)
        self.load.queued(key, tokens, plan.num_inference_steps)
        completed = False
        try:
            result = await super().denoise(job_id, attempt, embeddings, condition, plan)
            completed = True
            return result
        finally:
            self.load.finished(key, completed=completed)
            self.event("end" if completed else "failed", key)

    def _denoise(self, job_id, attempt, embeddings, condition, plan):
        self.current = f"{job_id}/{attempt}"  # one request at a time: the stage's lock is held
        return super()._denoise(job_id, attempt, embeddings, condition, plan)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.load.report()

    def event(self, what: str, job: str) -> None:
        path = os.environ.get(EVENTS_ENV)
        if path:
            with open(path, "a") as events:
                events.write(f"{time.time():.3f} {what} {self.replica} {job}\n")

    def __del__(self):
        self.event("stop", "-")
