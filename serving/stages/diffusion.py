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
        self,
        job_id: str,
        attempt: int,
        embeddings: PromptEmbeddings,
        condition: ImageCondition | None,
        plan: RenderPlan,
    ) -> DenoisedLatents:
        return await self._runner.run(self._denoise, job_id, attempt, embeddings, condition, plan)

    def _denoise(self, job_id, attempt, embeddings, condition, plan) -> DenoisedLatents:
        self._stop_if_abandoned(job_id, attempt, "before the first step")
        self._store.update(job_id, stage="diffusion", step=0, total_steps=plan.num_inference_steps)

        def after_step(finished: int, total: int) -> None:
            self._runner.stats.bump("steps_total")
            record = self._stop_if_abandoned(job_id, attempt, f"at step {finished} of {total}")
            progress = max(record.progress, diffusion_progress(finished, total))
            self._store.update(job_id, step=finished, total_steps=total, progress=progress)

        return self._denoiser.denoise(embeddings, condition, plan, after_step)

    def _stop_if_abandoned(self, job_id: str, attempt: int, where: str):
        """The job's record, or ``JobCancelled`` when nobody waits for this run any more.

        That is: the job was cancelled, deleted, already ended (e.g. timed out), or
        another orchestrator took it over and started a newer attempt.
        """
        record = self._store.get(job_id)
        if record is None or record.cancel_requested or record.status.is_terminal or record.attempts != attempt:
            self._runner.stats.bump("cancelled_total")
            raise JobCancelled(f"job {job_id} attempt {attempt} stopped {where}")
        return record

    def stats(self) -> dict:
        return self._runner.stats.snapshot()
