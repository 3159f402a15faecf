"""The orchestrator deployment: replicas that pull jobs from the store and drive them through the stages.

Thin: the logic is ``serving.jobs.orchestrator.Orchestrator``. On shutdown a
replica hands its jobs back (leases released, artifacts and checkpoints
kept), so a redeploy or a scale-down costs a successor's claim, not the work.
"""

from __future__ import annotations

from cluster.config import JobsConfig, ModelConfig, OrchestratorConfig, RewriterConfig
from serving.errors import StageDead
from serving.families import get_family
from serving.jobs.artifacts import open_artifacts
from serving.jobs.orchestrator import Orchestrator, StageHandles
from serving.jobs.results import ResultStore
from serving.jobs.store import open_store

__all__ = ["OrchestratorDeployment"]


class OrchestratorDeployment:
    def __init__(
        self, settings: OrchestratorConfig, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig,
        text_encoder, image_conditioner, diffusion, video_decoder, audio_decoder, muxer, prompt_rewriter=None,
    ):
        # Only the config sections it uses: scaling a stage changes none of them, so it never restarts this.
        family = get_family(model.family)
        limits = family.read_limits(model)
        count_tokens = family.token_counter(model)
        stages = StageHandles(
            text_encoder, image_conditioner, diffusion, video_decoder, audio_decoder, muxer, prompt_rewriter
        )
        self.orchestrator = Orchestrator(
            store=open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url),
            results=ResultStore(jobs.results_dir),
            artifacts=open_artifacts(jobs),
            stages=stages,
            model=model,
            jobs=jobs,
            rewriter=rewriter,
            settings=settings,
            temporal_compression=limits.temporal_compression,
            prompt_fits=lambda text: count_tokens(text) <= limits.max_prompt_tokens,
            owner=_replica_name(),
            condition_size=lambda plan: family.condition_size(model, plan),
        )
        self._started = False

    def _ensure_started(self) -> None:
        # The job loop needs the replica's event loop, which __init__ may not run on.
        if not self._started:
            self.orchestrator.start()
            self._started = True

    async def check_health(self) -> None:
        """Healthy while its job loop runs: a store outage is not this replica's fault."""
        self._ensure_started()
        if not self.orchestrator.healthy:
            raise StageDead("the orchestrator's job loop has stopped")

    async def wake(self) -> None:
        """A job was accepted: look for it now instead of at the next poll."""
        self._ensure_started()
        self.orchestrator.wake()

    def stats(self) -> dict:
        return self.orchestrator.stats.snapshot()

    async def __del__(self):
        await self.orchestrator.stop()


def _replica_name() -> str | None:
    """The job owner's name: this replica's id, so an operator can tell which replica holds a job."""
    try:
        from ray import serve

        return f"orchestrator-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # noqa: BLE001 - outside a Serve replica: a random name
        return None
