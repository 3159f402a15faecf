"""Diffusion stage: embeddings (+ photo latents) -> denoised video and audio latents.

After every denoising step it writes the job's progress to the job store and
checks the store's cancel flag; a cancelled job stops before the next step.
"""

from __future__ import annotations

from cluster.config import JobsConfig, ModelConfig
from serving.errors import JobCancelled
from serving.families import get_family
from serving.jobs.progress import diffusion_progress
from serving.jobs.store import open_store
from serving.protocol import DenoisedLatents, ImageCondition, PromptEmbeddings, RenderPlan
from serving.stages._base import StageRunner

__all__ = ["DiffusionStage"]


class DiffusionStage:
    def __init__(self, model: ModelConfig, jobs: JobsConfig):
        self._denoiser = get_family(model.family).denoiser(model)
        self._store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)
        self._runner = StageRunner("diffusion")

    async def denoise(
        self, job_id: str, embeddings: PromptEmbeddings, condition: ImageCondition | None, plan: RenderPlan
    ) -> DenoisedLatents:
        return await self._runner.run(self._denoise, job_id, embeddings, condition, plan)

    def _denoise(self, job_id, embeddings, condition, plan) -> DenoisedLatents:
        if self._store.is_cancel_requested(job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        self._store.update(job_id, stage="diffusion", step=0, total_steps=plan.num_inference_steps)

        def after_step(finished: int, total: int) -> None:
            self._runner.stats.bump("steps_total")
            self._store.update(job_id, step=finished, total_steps=total, progress=diffusion_progress(finished, total))
            if self._store.is_cancel_requested(job_id):
                self._runner.stats.bump("cancelled_total")
                raise JobCancelled(f"job {job_id} was cancelled at step {finished} of {total}")

        return self._denoiser.denoise(embeddings, condition, plan, after_step)

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
